"""Missions on record: `aerokv bag record | play | audit`, `aerokv swarm --record` and `aerokv report`
against `rosbags`, an independent rosbag2 implementation (pure Python), and rclpy as an independent
ROS 2 program.

Bags AeroKV writes are opened by `rosbags` and every message decoded, AeroKV's own message types
only from the definitions embedded in the bag; bags `rosbags` writes are played by AeroKV. One
recorded swarm mission (with a kill) is read by rosbags, audited, audited again after rosbags
rewrote it with one value changed, and turned into a report. Every swarm and node here is real
(DDS over shared memory, the real model).
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, ROOT, _domains, in_private_network, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

rosbags = pytest.importorskip("rosbags")
from rosbags.highlevel import AnyReader  # noqa: E402
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime  # noqa: E402
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode  # noqa: E402
from rosbags.typesys import Stores, get_types_from_msg, get_typestore  # noqa: E402

EVENTS = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
INFINITE = QosTime(9223372036, 854775807)


def qos(reliability, durability, depth=10):
    return Qos(QosHistory.KEEP_LAST, depth, reliability, durability, INFINITE, INFINITE, QosLiveliness.AUTOMATIC,
               INFINITE, False)


def read_all(bag: Path):
    """Every message of a bag, decoded by rosbags with a typestore that knows only the standard
    ROS 2 types: AeroKV's types can come only from the definitions inside the bag."""
    base = get_typestore(Stores.ROS2_JAZZY)
    assert "aerokv/msg/Heartbeat" not in base.types
    out = []
    with AnyReader([bag], default_typestore=base) as reader:
        for conn, stamp, raw in reader.messages():
            out.append((conn.topic, stamp, reader.deserialize(raw, conn.msgtype)))
        connections = {c.topic: c for c in reader.connections}
    return out, connections


def rosbags_typestore():
    """Standard types plus AeroKV's TokenChunk (and the Auth it carries), from their .msg files (for
    writing bags with rosbags)."""
    ts = get_typestore(Stores.ROS2_JAZZY)
    for name in ["Auth", "TokenChunk"]:
        ts.register(get_types_from_msg((ROOT / "msg" / f"{name}.msg").read_text(), f"aerokv/msg/{name}"))
    return ts


def write_rosbags_bag(path: Path, n=10, spacing_ns=100_000_000, compression=None):
    """A bag written by rosbags: std_msgs/String on /chatter (best effort) and aerokv TokenChunk on
    /aerokv/tokens (reliable, transient local), alternating, `spacing_ns` apart."""
    ts = rosbags_typestore()
    String, Chunk, Auth = (ts.types[t] for t in ["std_msgs/msg/String", "aerokv/msg/TokenChunk", "aerokv/msg/Auth"])
    start = 1_700_000_000_000_000_000
    w = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    if compression:
        w.set_compression(compression, CompressionFormat.ZSTD)
    with w:
        chatter = w.add_connection("/chatter", String.__msgtype__, typestore=ts,
                                   offered_qos_profiles=[qos(QosReliability.BEST_EFFORT, QosDurability.VOLATILE)])
        tokens = w.add_connection("/aerokv/tokens", Chunk.__msgtype__, typestore=ts,
                                  offered_qos_profiles=[qos(QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, 100)])
        for i in range(n):
            t = start + i * spacing_ns
            if i % 2 == 0:
                w.write(chatter, t, ts.serialize_cdr(String(data=f"message {i}"), String.__msgtype__))
            else:
                msg = Chunk(request_id=7, index=i, token_id=1000 + i, text=f" t{i}", done=False, finish_reason="", epoch=3,
                            auth=Auth(sender="", counter=0, signature=np.zeros(0, dtype=np.uint8)))
                w.write(tokens, t, ts.serialize_cdr(msg, Chunk.__msgtype__))
    return start, n, spacing_ns


def bag_cli(*args, timeout=60):
    return subprocess.run([BIN / "aerokv", "bag", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def mission(tmp_path_factory):
    """One recorded swarm mission (3 UAVs, uav2 killed after 8 tokens) for every test that reads
    one: (bag directory, the swarm's JSON answer)."""
    assert in_private_network(), "DDS tests must run inside `unshare -n` (use `make test` or scripts/test.sh)"
    first, count = (int(x) for x in os.environ.get("AEROKV_TEST_DOMAINS", "1:200").split(":"))
    env = {**os.environ, "ROS_DOMAIN_ID": str(first + (os.getpid() * 7 + next(_domains)) % count)}
    tmp = tmp_path_factory.mktemp("mission")
    bag = tmp / "mission"
    r = subprocess.run([BIN / "aerokv", "swarm", "--json", "--uavs", "3", "--user", "What is a drone?",
                        "--max-tokens", "20", "--kill", "uav2:8", "--record", bag, "--log-dir", tmp / "logs"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return bag, json.loads(r.stdout)


def rewrite(src: Path, dst: Path, change):
    """A copy of bag `src` written by rosbags (types from the bag's own definitions), with
    `change(topic, msg)` applied to every message; it returns True when it changed one. Returns
    how many were changed."""
    changed = 0
    with AnyReader([src], default_typestore=get_typestore(Stores.ROS2_JAZZY)) as reader:
        ts = reader.typestore
        with Writer(dst, version=9, storage_plugin=StoragePlugin.MCAP) as w:
            out = {c.id: w.add_connection(c.topic, c.msgtype, typestore=ts,
                                          offered_qos_profiles=c.ext.offered_qos_profiles)
                   for c in reader.connections}
            for conn, stamp, raw in reader.messages():
                msg = reader.deserialize(raw, conn.msgtype)
                if change(conn.topic, msg):
                    changed += 1
                    raw = ts.serialize_cdr(msg, conn.msgtype)
                w.write(out[conn.id], stamp, raw)
    return changed


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_a_swarm_mission_with_a_kill_is_recorded_and_decodes_in_rosbags(mission):
    bag, answer = mission
    assert [f["uav"] for f in answer["failures"]] == ["uav2"], answer["failures"]
    # A finished bag: metadata.yaml beside one .mcap, nothing left under a temporary name.
    assert sorted(p.name for p in bag.iterdir()) == ["metadata.yaml", "mission_0.mcap"]

    messages, connections = read_all(bag)
    topics = {t for t, _, _ in messages}
    for uav in ("uav1", "uav2", "uav3"):
        assert {f"/{uav}/heartbeat", f"/{uav}/battery"} <= topics, sorted(topics)
    assert {"/aerokv/assignment", "/aerokv/failures", "/aerokv/tokens", "/diagnostics"} <= topics, sorted(topics)
    # Activations and KV rows only when asked.
    assert not any(t.endswith(("/input", "/kv", "/replay")) for t in topics), sorted(topics)
    # rosbags' counts (from metadata.yaml) match what it decoded.
    for topic, conn in connections.items():
        assert conn.msgcount == sum(1 for t, _, _ in messages if t == topic), topic
    # Receive stamps never go backwards (one recorder thread stamps on arrival).
    stamps = [s for _, s, _ in messages]
    assert stamps == sorted(stamps)
    # QoS as offered: assignments latched and reliable, telemetry best effort.
    asg_qos = connections["/aerokv/assignment"].ext.offered_qos_profiles[0]
    assert (asg_qos.reliability, asg_qos.durability) == (QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL)
    assert connections["/uav1/heartbeat"].ext.offered_qos_profiles[0].reliability == QosReliability.BEST_EFFORT

    # Every declaration the watchdog published (on a loaded machine that can include UAVs declared
    # silent while the swarm starts, at epoch 0, which the scheduler ignores); uav2's kill once.
    failures = [m for t, _, m in messages if t == "/aerokv/failures"]
    killed = [f for f in failures if f.uav_id == "uav2" and f.epoch > 0]
    assert [f.reason for f in killed] == ["heartbeat_timeout"], failures
    assignments = [m for t, _, m in messages if t == "/aerokv/assignment"]
    epochs = [a.epoch for a in assignments]
    assert epochs == sorted(set(epochs)), epochs
    before = [a for a in assignments if a.epoch <= killed[0].epoch]
    after = [a for a in assignments if "failure of uav2" in a.reason]
    assert before and list(before[-1].ring) == ["uav1", "uav2", "uav3"], [(a.epoch, a.ring) for a in assignments]
    assert after and "uav2" not in after[0].ring and after[0].epoch > killed[0].epoch
    assert sum(u.layer_end - u.layer_start for u in after[0].uavs) == 30
    # The token stream in the bag is the answer.
    tokens = sorted((m.index, m.token_id) for t, _, m in messages if t == "/aerokv/tokens" and not m.done)
    assert [tid for _, tid in tokens] == answer["tokens"]
    beats = [m for t, _, m in messages if t == "/uav3/heartbeat"]
    assert beats and all(b.uav_id == "uav3" for b in beats)
    # What every assignment was decided from, one per epoch, latched beside it.
    inputs = [m for t, _, m in messages if t == "/aerokv/plan_inputs"]
    assert sorted(i.epoch for i in inputs) == epochs, ([i.epoch for i in inputs], epochs)
    failover = next(i for i in inputs if i.epoch == after[0].epoch)
    assert (failover.decision, failover.failed_uav, failover.based_on_epoch) == ("failover", "uav2", after[0].epoch - 1)
    assert {t.uav_id for t in failover.telemetry} >= {"uav1", "uav3"}


def audit(bag):
    return subprocess.run([BIN / "aerokv", "bag", "audit", bag], capture_output=True, text=True, timeout=60)


def test_audit_decides_every_recorded_assignment_again(mission):
    bag, _ = mission
    r = audit(bag)
    assert r.returncode == 0, r.stdout + r.stderr
    messages, _ = read_all(bag)
    epochs = sorted({m.epoch for t, _, m in messages if t == "/aerokv/assignment"})
    assert f"{len(epochs)} assignments decided again exactly, no divergence" in r.stdout, r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith("epoch")]
    assert [int(line.split()[1]) for line in lines] == epochs, r.stdout
    assert any("failover" in line and "failure of uav2" in line for line in lines), r.stdout


def test_audit_names_a_changed_assignment_or_telemetry_value(mission, tmp_path):
    bag, _ = mission
    messages, _ = read_all(bag)
    failover = next(m for t, _, m in messages if t == "/aerokv/assignment" and m.reason == "failure of uav2")

    # One UAV's K in the failover's assignment, as if the scheduler had published another plan.
    def more_k(topic, m):
        if topic == "/aerokv/assignment" and m.epoch == failover.epoch:
            m.uavs[0].overlap_layers += 1
            return True
        return False

    assert rewrite(bag, tmp_path / "k", more_k) >= 1
    r = audit(tmp_path / "k")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"divergence at epoch {failover.epoch} " in r.stderr, r.stderr
    assert f"recorded {failover.uavs[0].uav_id} K = {failover.uavs[0].overlap_layers + 1}, decided again = " \
        f"{failover.uavs[0].overlap_layers}" in r.stderr, r.stderr

    # The energy of a battery report a decision was made from: the inputs no longer match it.
    stamp = lambda t: t.sec * 10**9 + t.nanosec  # noqa: E731
    batteries = {(m.uav_id, stamp(m.stamp)) for t, _, m in messages if t.endswith("/battery")}
    used = [(i.epoch, t.uav_id, stamp(t.battery_stamp)) for topic, _, i in messages if topic == "/aerokv/plan_inputs"
            for t in i.telemetry if (t.uav_id, stamp(t.battery_stamp)) in batteries]
    assert used, "no battery report a decision used is in the bag"
    epoch, uav, battery_stamp = used[0]

    def less_energy(topic, m):
        if topic == f"/{uav}/battery" and stamp(m.stamp) == battery_stamp:
            m.energy_j *= 0.5
            return True
        return False

    assert rewrite(bag, tmp_path / "energy", less_energy) == 1
    r = audit(tmp_path / "energy")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"divergence at epoch {epoch} " in r.stderr and f"{uav}'s energy_j was " in r.stderr, r.stderr
    assert "in the plan inputs, but the BatteryHealth it came from" in r.stderr, r.stderr


def replay(bag, out, tmp_path):
    """`aerokv bag replay` of `bag` into a fresh swarm recorded in `out`, on a domain of its own."""
    first, count = (int(x) for x in os.environ.get("AEROKV_TEST_DOMAINS", "1:200").split(":"))
    env = {**os.environ, "ROS_DOMAIN_ID": str(first + (os.getpid() * 7 + next(_domains)) % count)}
    return subprocess.run([BIN / "aerokv", "bag", "replay", bag, "--out", out, "--user", "What is a drone?",
                           "--log-dir", tmp_path / f"{out.name}-logs"], capture_output=True, text=True, timeout=120,
                          env=env)


def ns(t):
    return t.sec * 10**9 + t.nanosec


def assert_under_the_recorded_clock(bag, new_messages, played):
    """The replayed swarm ran on the /clock the replay published from the recording's start (every
    node with use_sim_time: its stamps are on that clock, not the wall clock), and no played battery
    input went unheard: every battery report of a played UAV after the clock started came from it."""
    start = min(s for _, s, _ in read_all(bag)[0])
    clock = [ns(m.clock) for t, _, m in new_messages if t == "/clock"]
    # The clock starts at the recording's start; the replay's own recorder may match /clock a
    # few ticks after its first message (then the first it has is a little later).
    assert clock and start <= min(clock) < start + 500_000_000 and clock == sorted(clock), (start, clock[:3])
    beats = [ns(m.stamp) for t, _, m in new_messages if t.endswith("/heartbeat")]
    assert beats and min(beats) >= start and max(beats) <= max(clock), (start, min(beats), max(clock))
    reports = [(m.uav_id, ns(m.stamp), m.source) for t, _, m in new_messages if t.endswith("/battery")]
    late = [r for r in reports if r[0] in played and r[1] > start and r[2] != "sensor_msgs/BatteryState"]
    assert not late, late
    assert {u for u, s, src in reports if s > start} >= played, reports


def test_live_replay_makes_the_same_decisions_and_an_identical_answer(mission, tmp_path):
    bag, answer = mission
    r = replay(bag, tmp_path / "again", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert "the same" in r.stdout and "decisions and an identical answer" in r.stdout, r.stdout
    # The recorded kill was repeated at the same token.
    assert "kills [uav2:8]" in r.stderr, r.stderr[-4000:]
    assert "killed /uav2/shard_executor after 8 tokens" in r.stderr, r.stderr[-4000:]
    # Read independently: the new bag's decisions (by order, without epoch numbers) and answer
    # are the recorded ones, and the recorded battery inputs were played into it.
    def decisions(b):
        messages, _ = read_all(b)
        tokens = [(m.index, m.token_id, m.text) for t, _, m in messages if t == "/aerokv/tokens" and not m.done]
        done = next(s for t, s, m in messages if t == "/aerokv/tokens" and m.done)
        first = min(s for t, s, m in messages if t == "/aerokv/tokens")
        seen, out = set(), []
        for t, s, m in messages:
            # An idle re-plan (no request) may be recorded just before the answer's last chunk.
            idle = m.request_id == 0 and s > first if t == "/aerokv/assignment" else False
            if t == "/aerokv/assignment" and s < done and not idle and m.epoch not in seen:
                seen.add(m.epoch)
                out.append((m.reason, list(m.ring), m.resume_position,
                            [(u.uav_id, u.layer_start, u.layer_end, u.overlap_layers, u.snapshot_period) for u in m.uavs]))
        return out, sorted(tokens), messages
    rec, rec_tokens, _ = decisions(bag)
    new, new_tokens, new_messages = decisions(tmp_path / "again")
    assert new == rec and any(d[0] == "failure of uav2" for d in new), (rec, new)
    assert new_tokens == rec_tokens and [t[1] for t in new_tokens] == answer["tokens"]
    # Planned with the recorded layer latency, not one measured again.
    def latency(messages):
        return {u.layer_latency_s for t, _, m in messages if t == "/aerokv/plan_inputs" for u in m.telemetry}
    assert latency(new_messages) == latency(read_all(bag)[0]) and len(latency(new_messages)) == 1
    played = {t for t, _, m in new_messages if t.endswith("/battery_state")}
    assert played == {"/uav1/battery_state", "/uav2/battery_state", "/uav3/battery_state"}, sorted(played)
    recorded_soc = {round(m.state_of_charge, 6) for t, _, m in read_all(bag)[0] if t.endswith("/battery")}
    assert {round(m.percentage, 6) for t, _, m in new_messages if t.endswith("/battery_state")} <= recorded_soc
    assert_under_the_recorded_clock(bag, new_messages, {"uav1", "uav2", "uav3"})
    assert "sim time: /clock from " in r.stdout, r.stdout

    # A recording whose answer says something else at token 5 is not what the swarm answers again.
    changed = tmp_path / "changed"
    assert rewrite(bag, changed, lambda t, m: t == "/aerokv/tokens" and m.index == 5 and not setattr(m, "token_id", 7)) == 1
    r = replay(changed, tmp_path / "differs", tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr[-4000:]
    assert "first difference at answer token 5" in r.stderr and "recorded: id 7" in r.stderr, r.stderr[-4000:]


BATTERY_INPUT = r"""
import math, sys, time
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import BatteryState
rclpy.init()
node = rclpy.create_node("test_battery_input")
pub = node.create_publisher(BatteryState, sys.argv[1], qos_profile_sensor_data)
nan = math.nan
msg = BatteryState(percentage=float(sys.argv[2]), voltage=nan, current=nan, charge=nan, capacity=nan,
                   design_capacity=nan, temperature=nan, present=True)
while True:
    pub.publish(msg)
    time.sleep(0.1)
"""
LOW = 0.0000015  # of 2.7 MJ: ~4 J, not enough for the answer


@pytest.fixture(scope="module")
def retired(tmp_path_factory):
    """A recorded, signed swarm mission (3 UAVs, a keystore) in which uav3's battery, fed by an
    rclpy program as a sensor_msgs/BatteryState, is too low for the answer: uav3 is retired.
    Returns (bag directory, the swarm's JSON answer, the keystore)."""
    assert in_private_network(), "DDS tests must run inside `unshare -n` (use `make test` or scripts/test.sh)"
    first, count = (int(x) for x in os.environ.get("AEROKV_TEST_DOMAINS", "1:200").split(":"))
    env = {**os.environ, "ROS_DOMAIN_ID": str(first + (os.getpid() * 7 + next(_domains)) % count)}
    tmp = tmp_path_factory.mktemp("retired")
    ks = tmp / "ks"
    assert subprocess.run([BIN / "aerokv", "keys", "init", "--uavs", "3", ks], capture_output=True).returncode == 0
    for config in ["swarm.yaml", "uav.yaml"]:
        (tmp / config).write_text((ROOT / "config" / config).read_text().replace('keystore: ""', f'keystore: "{ks}"'))
    feeder = subprocess.Popen(["python3", "-c", BATTERY_INPUT, "/uav3/battery_state", str(LOW)], env=env)
    try:
        bag = tmp / "retired"
        r = subprocess.run([BIN / "aerokv", "swarm", "--json", "--uavs", "3", "--user", "What is a drone?",
                            "--max-tokens", "20", "--soc", f"uav3={LOW}", "--swarm-params", tmp / "swarm.yaml",
                            "--uav-params", tmp / "uav.yaml", "--record", bag, "--log-dir", tmp / "logs"],
                           capture_output=True, text=True, timeout=300, env=env)
    finally:
        feeder.kill()  # the process this fixture started
        feeder.wait()
    assert r.returncode == 0, r.stderr[-4000:]
    return bag, json.loads(r.stdout), ks


def png_rgb(path: Path):
    """The pixels of an 8-bit RGB(A) PNG as an (h, w, channels) array (zlib and the five filters)."""
    import zlib
    data = path.read_bytes()
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(h):
        f, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:
            cur = (np.cumsum(line.reshape(w, bpp), axis=0) % 256).reshape(-1)
        elif f == 2:
            cur = (line + prev) % 256
        else:
            cur, a = line.copy(), [0] * bpp
            for i in range(stride):
                left, up = (cur[i - bpp] if i >= bpp else 0), prev[i]
                ul = prev[i - bpp] if i >= bpp else 0
                if f == 3:
                    cur[i] = (cur[i] + (left + up) // 2) % 256
                else:
                    p = left + up - ul
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                    cur[i] = (cur[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else ul)) % 256
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp)


def test_a_retirement_is_recorded_signed_audited_and_reported(retired, mission, tmp_path):
    bag, answer, ks = retired
    assert [(f["uav"], f["mode"], f["token"]) for f in answer["failures"]] == [("uav3", "retirement", 1)], \
        answer["failures"]
    messages, _ = read_all(bag)
    retirement = [m for t, _, m in messages if t == "/aerokv/assignment" and m.reason == "retirement of uav3"]
    assert len({m.epoch for m in retirement}) == 1 and "uav3" not in retirement[0].ring
    inputs = {m.epoch: m for t, _, m in messages if t == "/aerokv/plan_inputs"}
    decided = inputs[retirement[0].epoch]
    assert (decided.decision, decided.failed_uav) == ("retirement", "uav3")
    # Signed by the scheduler like every other AeroKV message (Ed25519: 64 bytes).
    assert all(i.auth.sender == "aerokv/scheduler" and len(i.auth.signature) == 64 for i in inputs.values())

    # Audited: the retirement decided again exactly, every signed message verified.
    r = subprocess.run([BIN / "aerokv", "bag", "audit", bag, "--keystore", ks], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(line.startswith(f"epoch {retirement[0].epoch:>3}") and "retirement of uav3" in line
               and "decided again exactly" in line for line in r.stdout.splitlines()), r.stdout
    assert ", 0 unsigned, forged: 0 " in r.stdout and "every signed message authentic" in r.stdout, r.stdout
    verified = int(r.stdout.split("signatures: ")[1].split(" verified")[0])
    assert verified >= len(inputs) + len(retirement), r.stdout

    # One value of the retirement's inputs changed without signing again (rewritten by rosbags):
    # refused as forged, named with the file and the byte offset of its record.
    def forge(topic, m):
        if topic == "/aerokv/plan_inputs" and m.epoch == retirement[0].epoch:
            m.stamp.nanosec = (m.stamp.nanosec + 1) % 10**9
            return True
        return False

    forged = tmp_path / "forged"
    assert rewrite(bag, forged, forge) == 1
    r = subprocess.run([BIN / "aerokv", "bag", "audit", forged, "--keystore", ks], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    mcap = forged / "forged.mcap"
    line = next(x for x in r.stdout.splitlines() if x.startswith("not authentic: "))
    assert line.startswith(f"not authentic: {mcap}: byte offset ") and "/aerokv/plan_inputs" in line, r.stdout
    assert line.endswith("bad_signature") and 'sender "aerokv/scheduler"' in line, line
    offset = int(line.split("byte offset ")[1].split(":")[0])
    # There, independently of AeroKV's reader: an MCAP message record (opcode 5) holding the
    # forged message's CDR bytes as rosbags serialized them.
    data = mcap.read_bytes()
    length = struct.unpack("<Q", data[offset + 1:offset + 9])[0]
    with AnyReader([forged], default_typestore=get_typestore(Stores.ROS2_JAZZY)) as reader:
        raws = [bytes(raw) for c, _, raw in reader.messages() if c.topic == "/aerokv/plan_inputs"
                and reader.deserialize(raw, c.msgtype).epoch == retirement[0].epoch]
    assert data[offset] == 0x05 and any(raw in data[offset:offset + 9 + length] for raw in raws), offset
    assert "forged: 1 (unknown_sender 0, wrong_role 0, bad_signature 1," in r.stdout, r.stdout
    assert "1 message(s) not authentic" in r.stderr, r.stderr
    # The unsigned mission (no keystore) is refused message by message: every one unsigned.
    r = subprocess.run([BIN / "aerokv", "bag", "audit", mission[0], "--keystore", ks], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "signatures: 0 verified, " in r.stdout and " unsigned, forged: 0 " in r.stdout, \
        r.stdout[-3000:]

    # Reported: counted, listed, and marked in the layers figure in the retirement colour.
    out = tmp_path / "report"
    r = subprocess.run([BIN / "aerokv", "report", bag, "--out", out], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    summary = (out / "summary.md").read_text()
    assert "| failures / failovers / restarts / retirements | 0 / 0 / 0 / 1 |" in summary, summary
    assert "| uav3 | retirement | epoch " in summary, summary
    pixels = png_rgb(out / "layers.png")[..., :3]
    orange = np.all(pixels == (230, 140, 0), axis=-1)
    assert orange.sum() > 200, orange.sum()  # the marker line (and its label)


def test_live_replay_retires_at_the_same_token_under_sim_time(retired, tmp_path):
    bag, answer, _ = retired
    r = replay(bag, tmp_path / "again", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert any(x.split()[2:5] == ["retirement", "of", "uav3"] and x.endswith("same") for x in r.stdout.splitlines()
               if x.startswith("decision")), r.stdout
    assert "decisions and an identical answer" in r.stdout, r.stdout
    # The same retirement at the same token: its resume position (prompt + tokens out) and layout.
    def retirement(b):
        messages, _ = read_all(b)
        a = next(m for t, _, m in messages if t == "/aerokv/assignment" and m.reason == "retirement of uav3")
        return (a.resume_position, list(a.ring), [(u.layer_start, u.layer_end) for u in a.uavs]), messages
    rec, _ = retirement(bag)
    new, new_messages = retirement(tmp_path / "again")
    assert new == rec, (rec, new)
    tokens = sorted((m.index, m.token_id) for t, _, m in new_messages if t == "/aerokv/tokens" and not m.done)
    assert [tid for _, tid in tokens] == answer["tokens"]
    assert_under_the_recorded_clock(bag, new_messages, {"uav1", "uav2", "uav3"})


def test_a_report_shows_the_mission_with_its_failure(mission, tmp_path):
    bag, answer = mission
    out = tmp_path / "report"
    r = subprocess.run([BIN / "aerokv", "report", bag, "--out", out], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "summary.md")
    sizes = {}
    for name in ("soc.png", "layers.png", "throughput.png", "recovery.png", "bytes.png"):
        assert (out / name).stat().st_size > 10_000, name  # drawn, not an empty canvas
        sizes[name] = png_size(out / name)
    assert sizes["throughput.png"] == (1000, 800) and sizes["layers.png"] == (1000, 600), sizes
    summary = (out / "summary.md").read_text()
    for name in sizes:
        assert f"]({name})" in summary, name
    # uav2's declaration, answered by the failover (a loaded machine can add false declarations
    # the scheduler ignores, and the watchdog may declare UAVs while the swarm stops: listed too).
    assert "| uav2 | failure | heartbeat_timeout" in summary, summary
    assert "| uav2 | failover | epoch " in summary, summary
    assert "| uav2 | " in summary.split("## Failure to next token")[1], summary
    assert f"| tokens generated | {len(answer['tokens'])} |" in summary, summary
    counts = summary.split("| failures / failovers / restarts / retirements | ")[1].split(" |")[0]
    failures, failovers, restarts, retirements = map(int, counts.split(" / "))
    assert failures >= 1 and (failovers, restarts, retirements) == (1, 0, 0), counts


def test_a_truncated_mission_is_refused_by_audit_and_report(mission, tmp_path):
    bag, _ = mission
    cut = tmp_path / "cut"
    shutil.copytree(bag, cut)
    mcap = cut / "mission_0.mcap"
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) // 2])
    for cmd in (["bag", "audit", cut], ["report", cut, "--out", tmp_path / "report"]):
        r = subprocess.run([BIN / "aerokv", *cmd], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        assert f"{mcap}: truncated at byte offset " in r.stderr, r.stderr
        offset = int(r.stderr.split("truncated at byte offset ")[1].split(":")[0])
        assert 0 < offset < len(data) // 2
    # Nothing half-written: no report from a bag that could not be read.
    assert not (tmp_path / "report").exists()


def test_a_rosbags_bag_plays_in_order_with_its_timing_qos_and_clock(rclpy_node, procs, tmp_path):
    from aerokv.msg import TokenChunk
    from rosgraph_msgs.msg import Clock
    from std_msgs.msg import String

    bag = tmp_path / "written_by_rosbags"
    start, n, spacing = write_rosbags_bag(bag)
    got = []
    clock = []
    best_effort = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)
    rclpy_node.create_subscription(String, "/chatter", lambda m: got.append((time.monotonic(), m.data)), best_effort)
    # Reliable + transient local: matches only if the player offers what the bag recorded.
    rclpy_node.create_subscription(TokenChunk, "/aerokv/tokens", lambda m: got.append((time.monotonic(), m.text)), EVENTS)
    rclpy_node.create_subscription(Clock, "/clock", lambda m: clock.append(m.clock.sec * 10**9 + m.clock.nanosec),
                                   QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
    t0 = time.monotonic()
    player = procs([BIN / "aerokv", "bag", "play", bag, "--clock", "50", "--wait-for-subscribers"], "play")
    assert spin_until(rclpy_node, lambda: player.p.poll() is not None, timeout=60), player.output()
    wall = time.monotonic() - t0
    spin_until(rclpy_node, lambda: len(got) == n, timeout=3)
    assert player.p.returncode == 0, player.output()
    # In order on each topic (DDS does not order messages across topics).
    assert [text for _, text in got if text.startswith("message")] == [f"message {i}" for i in range(0, n, 2)], got
    assert [text for _, text in got if text.startswith(" t")] == [f" t{i}" for i in range(1, n, 2)], got
    got.sort()
    gaps_ms = [round((b - a) * 1e3) for (a, _), (b, _) in zip(got, got[1:])]
    print(f"\nrecorded spacing {spacing / 1e6:.0f} ms; received gaps (ms): {gaps_ms}")
    # The player waits for each message's time: it cannot be done before the recorded span.
    assert wall >= (n - 1) * spacing / 1e9, (wall, gaps_ms)
    # /clock carries the bag's time, forwards only, over the bag's span.
    assert clock and clock == sorted(clock), clock[:5]
    assert start <= clock[0] and clock[-1] >= start + (n - 1) * spacing - 2 * 10**9 // 50, (clock[0], clock[-1])
    assert "published 10 messages on 2 topics" in player.output()


def test_play_picks_topics_and_loops_until_sigint(rclpy_node, procs, tmp_path):
    from aerokv.msg import TokenChunk
    from std_msgs.msg import String

    bag = tmp_path / "loop"
    write_rosbags_bag(bag, n=6, spacing_ns=20_000_000, compression=CompressionMode.STORAGE)  # zstd chunks
    chatter, tokens = [], []
    best_effort = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)
    rclpy_node.create_subscription(String, "/chatter", lambda m: chatter.append(m.data), best_effort)
    rclpy_node.create_subscription(TokenChunk, "/aerokv/tokens", lambda m: tokens.append(m.text), EVENTS)
    player = procs([BIN / "aerokv", "bag", "play", bag, "--loop", "--topics", "/chatter", "--rate", "2",
                    "--wait-for-subscribers"], "play")
    # Three /chatter messages per pass: more than three means it played again from the start.
    assert spin_until(rclpy_node, lambda: len(chatter) >= 9, timeout=30), (chatter, player.output())
    assert player.stop(signal.SIGINT) == 0, player.output()
    assert chatter[:6] == ["message 0", "message 2", "message 4"] * 2
    assert tokens == []


def test_recorder_finishes_its_bag_on_sigterm_and_a_killed_one_leaves_no_bag(rclpy_node, procs, tmp_path):
    from std_msgs.msg import String

    pub = rclpy_node.create_publisher(String, "/bag_test/chatter", EVENTS)
    bags = {"sigterm": tmp_path / "sigterm", "sigkill": tmp_path / "sigkill"}
    recorders = {k: procs([BIN / "aerokv", "bag", "record", "-o", d, "/bag_test/chatter", "/bag_test/never"], k)
                 for k, d in bags.items()}
    # Both recorders subscribe once they see the publisher.
    assert spin_until(rclpy_node, lambda: pub.get_subscription_count() == 2, timeout=30), [r.output() for r in recorders.values()]
    sent = []
    for i in range(40):
        sent.append(f"hello {i}")
        pub.publish(String(data=sent[-1]))
        spin_until(rclpy_node, lambda: False, timeout=0.02)
    time.sleep(2.0)
    assert recorders["sigterm"].stop(signal.SIGTERM) == 0, recorders["sigterm"].output()
    out = recorders["sigterm"].output()
    assert "/bag_test/never never appeared" in out, out
    messages, connections = read_all(bags["sigterm"])
    assert [m.data for _, _, m in messages] == sent, out
    assert connections["/bag_test/chatter"].ext.offered_qos_profiles[0].durability == QosDurability.TRANSIENT_LOCAL

    recorders["sigkill"].stop(signal.SIGKILL)
    assert not (bags["sigkill"] / "metadata.yaml").exists()
    r = bag_cli("play", bags["sigkill"])
    assert r.returncode != 0
    assert f"{bags['sigkill']}: incomplete bag: no metadata.yaml" in r.stderr, r.stderr
    assert "sigkill_0.mcap.partial" in r.stderr, r.stderr


def test_truncated_and_corrupt_bags_fail_with_the_file_and_offset(ros_domain, tmp_path):
    def fresh(name, **kw):
        bag = tmp_path / name
        write_rosbags_bag(bag, **kw)
        return bag, bag / f"{name}.mcap"

    # Truncated: the file ends inside a record.
    bag, mcap = fresh("truncated")
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) * 2 // 3])
    for cmd in ("play", "info"):
        r = bag_cli(cmd, bag)
        assert r.returncode != 0, r.stderr
        assert f"{mcap}: truncated at byte offset " in r.stderr, r.stderr
        offset = int(r.stderr.split("truncated at byte offset ")[1].split(":")[0])
        assert 0 < offset < len(data) * 2 // 3

    # Corrupt: a channel whose message encoding is not cdr (its chunk's offset is named).
    bag, mcap = fresh("encoding")
    data = mcap.read_bytes()
    assert data.count(b"\x03\x00\x00\x00cdr") >= 2  # in the data section, and again in the summary
    mcap.write_bytes(data.replace(b"\x03\x00\x00\x00cdr", b"\x03\x00\x00\x00xdr", 1))
    r = bag_cli("play", bag)
    assert r.returncode != 0 and f"{mcap}: corrupt at byte offset " in r.stderr and "`xdr`, not cdr" in r.stderr, r.stderr

    # Corrupt: garbage inside a zstd-compressed chunk.
    bag, mcap = fresh("garbage", compression=CompressionMode.STORAGE)
    data = bytearray(mcap.read_bytes())
    chunk = data.index(b"zstd") + 4 + 8 + 8  # past the compression name and the compressed size
    data[chunk:chunk + 24] = b"\xff" * 24
    mcap.write_bytes(bytes(data))
    r = bag_cli("play", bag)
    assert r.returncode != 0 and f"{mcap}: corrupt at byte offset " in r.stderr, r.stderr

    # The untouched bag plays (nothing else differs).
    bag, _ = fresh("intact")
    r = bag_cli("info", bag)
    assert r.returncode == 0 and "| aerokv/msg/TokenChunk | 5 messages (reliable, transient_local)" in r.stdout, r.stdout
