"""Entry point of the runtime, both frozen by PyInstaller and as `python -m runtime`."""

from runtime.cli import main

if __name__ == "__main__":
    main()
