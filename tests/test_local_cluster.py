"""A real multi-node Ray cluster on this machine (cluster/local.sh): head + 2 worker nodes, token
auth, jobs through the real `ray job submit` CLI, and a tear-down that leaves no process behind.

The tests share one cluster (start-up is most of the cost) and run in file order; the last one
takes it down and checks by pid that nothing of it is left.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cluster_utils import LocalCluster, local_cluster, netns_available, processes_mentioning  # noqa: F401

# A job that proves it runs on a 3-node cluster: it sees the nodes, runs one task pinned to each
# worker node (by the node_w1 / node_w2 resources local.sh gives them), and writes what it saw.
CHECK_NODES = textwrap.dedent("""
    import json, socket, sys
    import ray

    ray.init()
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 3, f"expected 3 alive nodes, saw {len(alive)}"

    @ray.remote(num_cpus=1)
    def where():
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address()}

    ran = ray.get([where.options(resources={f"node_w{i}": 1}).remote() for i in (1, 2)])
    head = [n["NodeID"] for n in alive if n["Resources"].get("node:__internal_head__")]
    with open(sys.argv[1], "w") as f:
        json.dump({"alive": [n["NodeID"] for n in alive], "head": head, "ran": ran}, f)
    print("checked", len(alive), "nodes")
""")


def test_cluster_is_three_nodes_with_own_addresses(local_cluster):
    alive = local_cluster.alive_nodes()
    assert len(alive) == 3
    assert sum(n["is_head_node"] for n in alive) == 1
    workers = [n for n in alive if not n["is_head_node"]]
    assert sorted(n["resources_total"].get("CPU") for n in workers) == [1.0, 1.0]
    head = next(n for n in alive if n["is_head_node"])
    assert not head["resources_total"].get("CPU")  # the head runs drivers, not tasks
    if netns_available():
        # Separate hosts as far as Ray can tell: one network namespace and IP per node.
        assert local_cluster.net == "netns"
        assert len({n["node_ip"] for n in alive}) == 3
        assert {local_cluster.node_ip(w) for w in ("w1", "w2")} == {n["node_ip"] for n in workers}
    for name in local_cluster.node_names():
        assert local_cluster.node_processes(name), f"node {name} has no processes"
        local_cluster.raylet_pid(name)


def test_job_submitted_with_the_cli_runs_on_every_node(local_cluster, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "check_nodes.py").write_text(CHECK_NODES)
    out = tmp_path / "seen.json"  # the nodes share this machine's disk
    sid = local_cluster.submit(["python", "check_nodes.py", str(out)], working_dir=job_dir)
    info = local_cluster.wait_job(sid, timeout=180)
    assert info["status"] == "SUCCEEDED", local_cluster.job_logs(sid)[-3000:]
    seen = json.loads(out.read_text())
    assert len(seen["alive"]) == 3
    ran_on = {r["node_id"] for r in seen["ran"]}
    assert len(ran_on) == 2 and not ran_on & set(seen["head"])
    assert "checked 3 nodes" in local_cluster.job_logs(sid)


def _client_env_without_token(cluster: LocalCluster, home: Path) -> dict[str, str]:
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)  # and no ~/.ray/auth_token to fall back on
    return env


def test_submit_without_the_token_is_refused(local_cluster, tmp_path):
    entry = ["--", "python", "-c", "print('should not run')"]
    env = _client_env_without_token(local_cluster, tmp_path / "home")
    no_token = local_cluster.ray("job", "submit", "--address", local_cluster.dashboard_url,
                                 "--submission-id", "no-token", "--no-wait", *entry, env=env, check=False)
    assert no_token.returncode != 0
    assert "Unauthorized: Missing authentication token" in no_token.stderr, no_token.stderr[-2000:]

    # Another token is refused too; asked of the job API directly, which the CLI above talks to.
    wrong = urllib.request.Request(local_cluster.dashboard_url + "/api/jobs/",
                                   headers={"Authorization": f"Bearer {secrets.token_hex(32)}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=30)
    assert refused.value.code == 403

    # No job was left behind, and the cluster's own token still works.
    jobs = local_cluster.api("/api/jobs/")
    assert "no-token" not in {j.get("submission_id") for j in jobs}


def test_down_leaves_no_process_of_the_cluster(local_cluster):
    before = local_cluster.snapshot()
    assert len(before) > 10  # gcs, raylets, agents, workers...
    left = local_cluster.down()
    assert not left, f"still running after down: {sorted(left)}"
    assert not processes_mentioning(f"{local_cluster.state_dir}/")
    assert not (local_cluster.state_dir / "cluster.env").exists()
    if local_cluster.net == "netns":
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        net = (local_cluster.state_dir / "net")
        assert not net.exists()
        assert local_cluster.state_dir.name not in namespaces
