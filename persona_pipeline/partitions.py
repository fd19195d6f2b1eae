"""One dynamic partition per persona (the persona sensor adds the keys)."""

import dagster as dg

persona_partitions = dg.DynamicPartitionsDefinition(name="personas")
