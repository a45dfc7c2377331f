"""Shared fixtures: the built binaries, a private ROS domain per swarm, and node processes that are
started and stopped by their ids. DDS tests must run inside `unshare -n` (scripts/test.sh does it)."""
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("AEROKV_BIN_DIR", ROOT / "target" / "release"))
MODELS = Path(os.environ.get("AEROKV_MODELS", ROOT / "models" / "generated"))
# A prompt of ~330 tokens: fed in several prefill chunks (PREFILL_CHUNK_TOKENS = 128).
LONG_PROMPT = (
    "You are the mission assistant of a survey team. Read the briefing and answer the question at the end. "
    "Briefing: four quadcopters left the base camp at dawn to map a glacier valley before the afternoon wind. "
    "Each drone carries a camera, a thermal sensor and a small radio that links it to its two neighbours. "
    "The first drone follows the river to the north, the second climbs to the ridge on the east side, "
    "the third circles the lake in the middle of the valley, and the fourth stays above the camp as a relay. "
    "The battery of the second drone is older than the others and lasts about twenty minutes less. "
    "At nine o'clock the wind rose on the ridge, and the second drone used more power than planned. "
    "The team lead decided to shorten its route and to let the third drone cover the southern slope instead. "
    "At ten o'clock the thermal sensor of the first drone found a warm spot near the river bank, "
    "where a group of hikers had set up a tent. The hikers were safe and waved at the drone. "
    "At eleven o'clock all four drones returned to the camp, and the maps were merged into one picture "
    "of the valley, with the lake, the ridge, the river and the tent of the hikers marked on it. "
    "Question: which drone had the weakest battery, and what did the team do about it?"
)
_domains = itertools.count()


def in_private_network() -> bool:
    """True inside `unshare -n`: the only network interface is loopback."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]  # per network namespace
    return [line.split(":")[0].strip() for line in lines] == ["lo"]


@pytest.fixture
def ros_domain(monkeypatch):
    """A ROS domain id of our own: shared memory crosses network namespaces, so concurrent swarms
    (other test runs on this machine) must not share one."""
    if not in_private_network():
        pytest.fail("DDS tests must run inside `unshare -n` (use `make test` or scripts/test.sh)")
    assert os.environ.get("FASTDDS_BUILTIN_TRANSPORTS") == "SHM", "source scripts/env.sh first"
    assert "ROS_AUTOMATIC_DISCOVERY_RANGE" not in os.environ
    # AEROKV_TEST_DOMAINS=FIRST:COUNT keeps concurrent test runs on this machine apart.
    first, count = (int(x) for x in os.environ.get("AEROKV_TEST_DOMAINS", "1:200").split(":"))
    domain = first + (os.getpid() * 7 + next(_domains)) % count
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    return domain


class Proc:
    def __init__(self, args, log: Path, env=None):
        self.args = [str(a) for a in args]
        self.log = log
        self.fh = open(log, "w")
        self.node_logs: Path | None = None  # a launcher's --log-dir, shown by output()
        self.p = subprocess.Popen(self.args, stdout=self.fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return None
        finally:
            self.fh.close()

    def output(self) -> str:
        if not self.fh.closed:
            self.fh.flush()
        out = self.log.read_text(errors="replace")
        for node_log in sorted(self.node_logs.glob("*.log")) if self.node_logs else []:
            tail = node_log.read_text(errors="replace").splitlines()[-8:]
            out += f"\n--- {node_log.name} (last lines)\n" + "\n".join(tail)
        return out


@pytest.fixture
def procs(tmp_path):
    """Start processes; every one still running at the end is stopped (by its own pid): SIGTERM,
    SIGKILL after 10 s."""
    started = []

    def start(args, name="proc", env=None):
        p = Proc(args, tmp_path / f"{name}-{len(started)}.log", env=env)
        started.append(p)
        return p

    yield start
    # SIGTERM first: a launcher stops its nodes (and removes what they leave in /dev/shm).
    for p in started:
        p.stop(signal.SIGTERM, timeout=10)


@pytest.fixture
def rclpy_node(ros_domain):
    rclpy = pytest.importorskip("rclpy")
    rclpy.init()
    node = rclpy.create_node(f"aerokv_test_probe_{os.getpid()}")
    yield node
    node.destroy_node()
    rclpy.shutdown()


def spin_until(node, predicate, timeout=10.0):
    import rclpy

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        rclpy.spin_once(node, timeout_sec=0.05)
    return predicate()


def launch_swarm(procs, tmp_path, uavs, **scheduler):
    """control.launch.xml with config/swarm.yaml's scheduler parameters updated by `scheduler`,
    and uav.launch.xml per UAV, logs under tmp_path/nodes. Returns (control, {uav: process})."""
    import yaml

    params = yaml.safe_load((ROOT / "config/swarm.yaml").read_text())
    params["/**/scheduler"]["ros__parameters"].update(scheduler)
    swarm_yaml = tmp_path / "swarm.yaml"
    swarm_yaml.write_text(yaml.safe_dump(params))
    logs = tmp_path / "nodes"
    control = procs([BIN / "aerokv", "launch", ROOT / "launch/control.launch.xml", f"params_file:={swarm_yaml}",
                     f"expected_uavs:={len(uavs)}", "--log-dir", logs], "control")
    control.node_logs = logs
    return control, {u: procs([BIN / "aerokv", "launch", ROOT / "launch/uav.launch.xml", f"uav_id:={u}",
                               "--log-dir", logs / u], u) for u in uavs}
