"""The shipped Kubernetes base job template (containers/k8s/gpu-job-template.json, issue 27):
every placeholder its job configuration uses is a declared variable, and Prefect's own templating
resolves it to a Job whose container requests GPUs and mounts the shared volume."""

from __future__ import annotations

import json

from tests.conftest import ROOT


def test_gpu_job_template_resolves_with_prefects_templating():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads((ROOT / "containers/k8s/gpu-job-template.json").read_text())
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    declared = set(template["variables"]["properties"])
    assert used <= declared, sorted(used - declared)
    values = {k: v.get("default") for k, v in template["variables"]["properties"].items()} | {"gpus": 4}
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container, = pod["containers"]
    assert job["kind"] == "Job" and container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["volumeMounts"][0]["mountPath"] == "/shared"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mopd-shared"
