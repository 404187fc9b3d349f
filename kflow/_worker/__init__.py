"""Private implementation of :mod:`kflow.worker`; import the public names from there."""
