"""``python -m kflow`` runs the command line."""

from kflow.cli import main

if __name__ == "__main__":
    main()
