"""Allow ``python -m gvsl_cli``."""

from gvsl_cli.cli import main

if __name__ == "__main__":
    main()
