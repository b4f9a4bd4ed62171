"""Subcommands of the `mosaic` command line, one module each (see `memory_mosaics.cli`)."""
