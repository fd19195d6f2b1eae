"""The Celery code location: persona_pipeline's one Definitions, with dagster-celery's
celery_executor as the executor of every job, configured from run_config.yaml next to this file.

A run worker (a process on the main server) sends each step to the broker; workers take it from
their queue: `lora_model` carries the op tag `dagster-celery/queue: gpu` (deploy/k8s/training_tags.yaml)
and goes to the GPU workers, every other step to the default queue `dagster`. Every asset returns
a MaterializeResult and reads what it needs from the application database and PERSONA_HOME, so
workers on other machines share nothing else (start-worker.sh).

Load it with `dagster code-server start --python-file deploy/celery/definitions.py` (deploy/README.md).
Workers load this same file, at the same path, for the steps they run.
"""

from pathlib import Path

import dagster as dg
import yaml
from dagster_celery import celery_executor

from persona_pipeline.definitions import build_definitions

RUN_CONFIG = Path(__file__).with_name("run_config.yaml")
EXECUTOR_CONFIG = yaml.safe_load(RUN_CONFIG.read_text())["execution"]["config"]

celery_steps_executor = celery_executor.configured(EXECUTOR_CONFIG, name="celery_steps")

defs = dg.Definitions.merge(build_definitions(), dg.Definitions(executor=celery_steps_executor))
