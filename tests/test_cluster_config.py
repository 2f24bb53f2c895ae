"""`cluster.yaml` and `cluster-local.yaml` pass Ray's own cluster-config schema (as `ray up` checks)."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_yaml_is_valid_for_ray_up(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / name).read_text())
    validate_config(prepare_config(config))
    assert any("steer-actors" in c for c in config["setup_commands"])


def test_schema_rejects_a_broken_config():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["bogus_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
