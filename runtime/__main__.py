"""Entry point of the runtime, both frozen by PyInstaller and as `python -m runtime`."""

from runtime import packaged, runtime_cache

runtime_cache.prepare(packaged.launch())  # first: a damaged unpacked runtime must not go on loading

from runtime import openblas  # noqa: E402

openblas.keep_idle()  # before anything imports NumPy

from runtime.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
