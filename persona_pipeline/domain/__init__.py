"""Pure domain logic: no Dagster, no database, no file system. Unit-tested directly."""
