"""The `jestcurate` command line. Each command turns its options into a config and calls run();
expected errors print one line and exit 2, failed shards exit 1."""

# isort: skip_file
# Each module registers its commands with the app; in this order they are listed in --help.
from jestcurate.cli import score, sets, choose, evaluate, local, views, models  # noqa: F401
from jestcurate.cli.app import app, main

__all__ = ["app", "main"]
