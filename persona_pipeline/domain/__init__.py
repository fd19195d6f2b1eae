"""Pure domain logic: no Dagster, no database; the only file reads are workflow templates. Unit-tested directly."""
