"""Entry point of the runtime, both frozen by PyInstaller and as `python -m runtime`."""

from runtime import openblas

openblas.keep_idle()  # before anything imports NumPy

from runtime.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
