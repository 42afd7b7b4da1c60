"""The shipped deploy/ configs, loaded through the executors' and launchers' own schemas.

dagster-k8s and dagster-celery (the ``deploy`` extra) validate what Dagster would validate at run
launch: run config against ``k8s_job_executor`` / ``celery_executor``, the instance's
``K8sRunLauncher`` config, and every step pod built by dagster-k8s's own ``construct_dagster_k8s_job``
(which checks each container / pod key against the kubernetes client's models). Nothing here needs
a cluster, a broker or a network.

The KubeRay RayJob has no schema offline (the CRD lives in the cluster): its own fields are checked
against KubeRay's ray.io/v1 field names written out below, its pod templates against the kubernetes
client's V1PodTemplateSpec, and its entrypoint against the ``dagster asset materialize`` parser
and the shipped catalog. Not checked: value formats the API server validates (quantities, names),
and KubeRay's own defaulting and webhook rules.
"""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import dagster as dg
import pytest
import yaml

dagster_k8s = pytest.importorskip("dagster_k8s", reason="the deploy extra (pip install -e '.[deploy]') is absent")
dagster_celery = pytest.importorskip("dagster_celery", reason="the deploy extra is absent")

import kubernetes  # noqa: E402  (installed with dagster-k8s)
from dagster._config import validate_config  # noqa: E402
from dagster_k8s import K8sRunLauncher, k8s_job_executor  # noqa: E402
from dagster_k8s.container_context import K8sContainerContext  # noqa: E402
from dagster_k8s.job import (DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job,  # noqa: E402
                             get_user_defined_k8s_config)
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict  # noqa: E402

from conftest import local_resources  # noqa: E402
from nfhm_pipeline.assets import gpu_step_tags  # noqa: E402
from nfhm_pipeline.catalog import load_catalog  # noqa: E402
from nfhm_pipeline.definitions import build_definitions  # noqa: E402
from nfhm_pipeline.errors import SettingsError  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
EMBEDDING_STAGES = ("image_embeddings", "text_embeddings")


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def vlm4bio_defs():
    return build_definitions(load_catalog("vlm4bio"), local_resources(Path("unused")))


def job_with_executor(defs, executor):
    """The shipped catalog's assets as one job run by ``executor`` (as Definitions(executor=...)
    would make every job)."""
    job = dg.define_asset_job("deploy_check", selection=dg.AssetSelection.all(), executor_def=executor)
    return dg.Definitions(assets=defs.assets, resources=defs.resources, jobs=[job]).resolve_job_def("deploy_check")


# -- the op tags on the embedding assets ------------------------------------------------------------

def test_embedding_assets_carry_the_shipped_gpu_tags_and_no_other_asset_does(vlm4bio_defs):
    shipped = load("k8s-gpu-op-tags.yaml")
    assert gpu_step_tags() == shipped
    tagged = set()
    for asset in vlm4bio_defs.assets:
        tags = asset.op.tags
        if "dagster-k8s/config" in tags:
            tagged.add(asset.key.path[-1])
            assert json.loads(tags["dagster-k8s/config"]) == shipped["dagster-k8s/config"]
            assert tags["dagster-celery/queue"] == "gpu"
        else:
            assert "dagster-celery/queue" not in tags, asset.key
    assert tagged == set(EMBEDDING_STAGES)


def test_gpu_limit_follows_the_environment_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv("NFHM_K8S_GPU_LIMIT", "4")
    defs = build_definitions(load_catalog("demo"), local_resources(Path("unused")))
    embedding = next(a for a in defs.assets if a.key.path[-1] == "image_embeddings")
    config = get_user_defined_k8s_config(embedding.op.tags)  # dagster-k8s's own reading of the tag
    assert config.container_config["resources"]["limits"]["nvidia.com/gpu"] == "4"
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("NFHM_K8S_GPU_LIMIT", bad)
        with pytest.raises(SettingsError, match="NFHM_K8S_GPU_LIMIT"):
            build_definitions(load_catalog("demo"), local_resources(Path("unused")))


# -- Kubernetes: run config, instance, and the step pods they make ------------------------------------

def launcher_config() -> dict:
    instance = load("dagster-instance-k8s.yaml")
    assert (instance["run_launcher"]["module"], instance["run_launcher"]["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = validate_config(K8sRunLauncher.config_type(), instance["run_launcher"]["config"])
    assert result.success, result.errors
    return result.value


def executor_config(defs, run_config: dict) -> dict:
    resolved = dg.validate_run_config(job_with_executor(defs, k8s_job_executor), run_config)
    return resolved["execution"]["k8s"]  # the resolved config is keyed by the executor's name


def step_pod(defs, step_name: str, tags: dict, exc: dict, launcher: dict) -> kubernetes.client.V1Job:
    """The Kubernetes Job dagster-k8s would create for one step, merged in K8sStepHandler's order:
    run launcher, executor (its config fields as k8s_job_executor maps them), op tags, per-step."""
    context = K8sContainerContext(
        image_pull_policy=launcher.get("image_pull_policy"), service_account_name=launcher.get("service_account_name"),
        env_secrets=launcher.get("env_secrets"), env_vars=launcher.get("env_vars"), namespace=launcher.get("job_namespace"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(launcher.get("run_k8s_config") or {}),
    ).merge(K8sContainerContext(
        env_secrets=exc.get("env_secrets"), env_vars=exc.get("env_vars"), namespace=exc.get("job_namespace"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(exc.get("step_k8s_config", {})),
    )).merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags))).merge(
        K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
            exc.get("per_step_k8s_config", {}).get(step_name, {}))))
    job_config = DagsterK8sJobConfig(  # what K8sContainerContext.get_k8s_job_config takes from the launcher
        job_image=exc.get("job_image") or launcher["job_image"], dagster_home=launcher["dagster_home"],
        instance_config_map=launcher["instance_config_map"],
        postgres_password_secret=launcher["postgres_password_secret"])
    job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], f"dagster-step-{step_name[:40]}",
                                    user_defined_k8s_config=context.run_k8s_config)
    assert context.namespace == "nfhm"
    return job


def test_k8s_run_config_and_instance_build_a_gpu_pod_for_exactly_the_embedding_steps(vlm4bio_defs):
    exc = executor_config(vlm4bio_defs, load("k8s-run-config.yaml"))
    launcher = launcher_config()
    gpu_steps = set()
    for asset in vlm4bio_defs.assets:
        job = step_pod(vlm4bio_defs, asset.op.name, asset.op.tags, exc, launcher)
        pod = job.spec.template.spec
        container = pod.containers[0]
        names = {e.name for e in container.env}
        assert {"NFHM_CATALOG", "NFHM_STORAGE_ROOT", "NFHM_DATA_DIR"} <= names, asset.key
        assert "/data/nfhm" in {m.mount_path for m in container.volume_mounts}
        if "nvidia.com/gpu" in (container.resources.limits or {}):
            gpu_steps.add(asset.key.path[-1])
            assert container.resources.limits["nvidia.com/gpu"] == "1"
            assert container.resources.requests == {"cpu": "8", "memory": "32Gi"}
            assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
            assert pod.tolerations[0].key == "nvidia.com/gpu"
            assert "/dev/shm" in {m.mount_path for m in container.volume_mounts}
        else:
            assert pod.node_selector is None and container.resources.requests == {"cpu": "1", "memory": "4Gi"}
    assert gpu_steps == set(EMBEDDING_STAGES)


def test_gpu_tag_alone_requests_the_gpu_when_run_config_has_no_per_step_override(vlm4bio_defs):
    run_config = copy.deepcopy(load("k8s-run-config.yaml"))
    del run_config["execution"]["config"]["per_step_k8s_config"]
    exc = executor_config(vlm4bio_defs, run_config)
    embedding = next(a for a in vlm4bio_defs.assets if a.key.path[-1] == "image_embeddings")
    container = step_pod(vlm4bio_defs, embedding.op.name, embedding.op.tags, exc, launcher_config()).spec.template.spec.containers[0]
    assert container.resources.limits == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}  # deep merge
    assert container.resources.requests == {"cpu": "1", "memory": "4Gi"}  # from step_k8s_config


def test_misspelt_k8s_executor_key_is_refused(vlm4bio_defs):
    run_config = copy.deepcopy(load("k8s-run-config.yaml"))
    run_config["execution"]["config"]["max_concurent"] = run_config["execution"]["config"].pop("max_concurrent")
    with pytest.raises(dg.DagsterInvalidConfigError, match="max_concurent"):
        dg.validate_run_config(job_with_executor(vlm4bio_defs, k8s_job_executor), run_config)


def test_misspelt_kubernetes_field_inside_step_config_is_refused(vlm4bio_defs):
    # container_config is free-form to Dagster's schema; the kubernetes models catch the typo
    # when dagster-k8s reads the step's config
    run_config = copy.deepcopy(load("k8s-run-config.yaml"))
    step = run_config["execution"]["config"]["per_step_k8s_config"]["vlm4bio__image_embeddings"]
    step["container_config"]["resorces"] = step["container_config"].pop("resources")
    exc = executor_config(vlm4bio_defs, run_config)
    with pytest.raises(Exception, match="Unexpected keys in model class V1Container: {'resorces'}"):
        step_pod(vlm4bio_defs, "vlm4bio__image_embeddings", {}, exc, launcher_config())


def test_misspelt_run_launcher_key_is_refused():
    config = load("dagster-instance-k8s.yaml")["run_launcher"]["config"]
    config["job_namspace"] = config.pop("job_namespace")
    result = validate_config(K8sRunLauncher.config_type(), config)
    assert not result.success and "job_namspace" in str(result.errors)


# -- Celery ----------------------------------------------------------------------------------------

def celery_settings() -> set[str]:
    from celery.app.defaults import DEFAULTS

    return set(DEFAULTS)


def test_celery_run_config_is_valid_for_the_celery_executor_and_names_real_celery_settings(vlm4bio_defs):
    from dagster_celery import celery_executor

    config = load("celery-run-config.yaml")
    resolved = dg.validate_run_config(job_with_executor(vlm4bio_defs, celery_executor), config)
    execution = resolved["execution"]["celery"]
    assert execution["broker"].startswith("pyamqp://")
    assert set(execution["config_source"]) <= celery_settings()
    assert execution["config_source"]["worker_prefetch_multiplier"] == 1


def test_misspelt_celery_keys_are_refused(vlm4bio_defs):
    from dagster_celery import celery_executor

    config = load("celery-run-config.yaml")
    config["execution"]["config"]["brokr"] = config["execution"]["config"].pop("broker")
    with pytest.raises(dg.DagsterInvalidConfigError, match="brokr"):
        dg.validate_run_config(job_with_executor(vlm4bio_defs, celery_executor), config)
    # config_source is passed to Celery as is: the check against Celery's own settings catches it
    source = load("celery-run-config.yaml")["execution"]["config"]["config_source"]
    source["task_acks_lately"] = source.pop("task_acks_late")
    assert set(source) - celery_settings() == {"task_acks_lately"}


# -- KubeRay ---------------------------------------------------------------------------------------

# Field names of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1: rayjob_types.go,
# raycluster_types.go), spec side only.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                   "headServiceAnnotations", "suspend"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}


def check_rayjob(doc: dict) -> list:
    """What the offline check can say about a RayJob: unknown fields (KubeRay's names), pod
    templates that the kubernetes models refuse. Returns the V1PodTemplateSpecs (head, workers)."""
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    k8s_model_from_dict(kubernetes.client.V1ObjectMeta, k8s_snake_case_dict(kubernetes.client.V1ObjectMeta, doc["metadata"]))
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"rayStartParams", "template"} <= set(head)
    groups = cluster.get("workerGroupSpecs", [])
    for group in groups:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
        assert {"groupName", "rayStartParams", "template"} <= set(group)
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 2**31 - 1)
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert all(isinstance(v, str) for v in params.values())  # map[string]string
    return [k8s_model_from_dict(kubernetes.client.V1PodTemplateSpec,
                                k8s_snake_case_dict(kubernetes.client.V1PodTemplateSpec, t["template"]))
            for t in [head] + groups]


def test_kuberay_rayjob_runs_one_embedding_partition_of_the_shipped_catalog_on_a_gpu_worker():
    doc = load("kuberay-embeddings-rayjob.yaml")
    head, *workers = check_rayjob(doc)
    # the entrypoint parses as the dagster CLI command it names, and selects a real asset and partition
    from dagster._cli.asset import asset_materialize_command

    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["dagster", "asset", "materialize"]
    params = asset_materialize_command.make_context("materialize", argv[3:]).params
    catalog = load_catalog("vlm4bio")
    dataset, stage = params["select"].split("/")
    assert dataset in catalog.datasets and stage in EMBEDDING_STAGES
    assert params["partition"] in [m.key for m in catalog.models_for(dataset)]
    assert params["module_name"] == "nfhm_pipeline.definitions"
    # GPUs: the entrypoint asks Ray for as many as a worker pod gets from Kubernetes; the head has none
    gpus = float(doc["spec"]["entrypointNumGpus"])
    assert "nvidia.com/gpu" not in (head.spec.containers[0].resources.limits or {})
    assert head.spec.containers[0].resources.requests["cpu"] and doc["spec"]["rayClusterSpec"]["headGroupSpec"][
        "rayStartParams"]["num-cpus"] == "0"
    (worker,) = workers
    assert float(worker.spec.containers[0].resources.limits["nvidia.com/gpu"]) == gpus
    assert float(doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"]) == gpus
    env = {e.name for e in worker.spec.containers[0].env}
    assert {"NFHM_CATALOG", "NFHM_STORAGE_ROOT", "NFHM_DATA_DIR", "DAGSTER_HOME"} <= env


def test_misspelt_rayjob_and_pod_fields_are_refused():
    doc = load("kuberay-embeddings-rayjob.yaml")
    doc["spec"]["entrypointNumGPUs"] = doc["spec"].pop("entrypointNumGpus")
    with pytest.raises(AssertionError, match="entrypointNumGPUs"):
        check_rayjob(doc)
    doc = load("kuberay-embeddings-rayjob.yaml")
    worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["nodeSelecter"] = worker.pop("nodeSelector")
    with pytest.raises(Exception, match="nodeSelecter"):
        check_rayjob(doc)
