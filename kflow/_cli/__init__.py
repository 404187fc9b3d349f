"""Private implementation of :mod:`kflow.cli`: shared options, error handling and the commands."""
