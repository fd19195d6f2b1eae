"""The Kubernetes code location: persona_pipeline's one Definitions, with dagster-k8s's
k8s_job_executor as the executor of every job, configured from run_config.yaml next to this file.

Each run is a pod (K8sRunLauncher, dagster.yaml or values.yaml) that starts one pod per step; the
`lora_model` step's pod gets the GPU from that asset's `dagster-k8s/config` tag (training_tags.yaml).
Every asset returns a MaterializeResult and reads what it needs from the application database and
PERSONA_HOME, so steps in different pods share nothing else.

Served by `dagster api grpc --python-file /app/deploy/k8s/definitions.py` (values.yaml); run and
step pods load this same file from the same image.
"""

from pathlib import Path

import dagster as dg
import yaml
from dagster_k8s import k8s_job_executor

from persona_pipeline.definitions import build_definitions

RUN_CONFIG = Path(__file__).with_name("run_config.yaml")
EXECUTOR_CONFIG = yaml.safe_load(RUN_CONFIG.read_text())["execution"]["config"]

step_per_pod_executor = k8s_job_executor.configured(EXECUTOR_CONFIG, name="k8s_step_per_pod")

defs = dg.Definitions.merge(build_definitions(), dg.Definitions(executor=step_per_pod_executor))
