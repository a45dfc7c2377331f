"""`colcon build` (colcon from PyPI, against the PyPI ROS prefix) builds the interfaces and the Rust
binaries of this package and installs them into the ROS layout; an installed node then talks to rclpy."""
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, spin_until
from rclpy.qos import qos_profile_sensor_data

BINARIES = ["aerokv", "battery_monitor", "shard_executor", "scheduler", "watchdog"]


@pytest.fixture(scope="module")
def colcon_install(tmp_path_factory):
    ws = tmp_path_factory.mktemp("colcon_ws")
    (ws / "src").mkdir()
    (ws / "src" / "aerokv").symlink_to(ROOT)
    venv = Path(os.environ["VIRTUAL_ENV"])
    ros_libs = [str(p) for p in sorted((venv / "lib/python3.11/site-packages").glob("ros_*.libs"))]
    env = {k: v for k, v in os.environ.items() if k not in ("IDL_PACKAGE_FILTER", "PYTHONPATH")}
    # Only the PyPI ROS prefix: nothing from the development build of the interfaces.
    env.update(
        AMENT_PREFIX_PATH=str(venv),
        CMAKE_PREFIX_PATH=str(venv),
        LD_LIBRARY_PATH=":".join([str(venv / "lib")] + ros_libs),
    )
    log = ws / "colcon.log"
    with open(log, "w") as fh:
        code = subprocess.call(
            ["colcon", "build", "--event-handlers", "console_direct-", "--cmake-args", "-DBUILD_TESTING=OFF", f"-DPython3_EXECUTABLE={venv}/bin/python"],
            cwd=ws, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=1800,
        )
    assert code == 0, log.read_text()[-4000:]
    return ws / "install" / "aerokv", env


def test_colcon_installs_binaries_launch_files_config_and_interfaces(colcon_install):
    prefix, _ = colcon_install
    for b in BINARIES:
        assert os.access(prefix / "lib" / "aerokv" / b, os.X_OK), b
    for f in ["uav.launch.xml", "control.launch.xml", "swarm.launch.xml"]:
        assert (prefix / "share/aerokv/launch" / f).is_file()
    for f in ["uav.yaml", "swarm.yaml"]:
        assert (prefix / "share/aerokv/config" / f).is_file()
    assert (prefix / "share/aerokv/package.xml").is_file()
    assert (prefix / "share/ament_index/resource_index/packages/aerokv").is_file()
    assert list((prefix / "lib").glob("libaerokv__rosidl_typesupport_c.so"))
    assert list(prefix.glob("lib/python3.11/site-packages/aerokv/msg/_heartbeat.py"))


def test_colcon_builds_without_px4_msgs_when_the_workspace_has_none(colcon_install):
    prefix, _ = colcon_install
    cache = (prefix.parent.parent / "build" / "aerokv" / "CMakeCache.txt").read_text()
    assert "px4_msgs_DIR:PATH=px4_msgs_DIR-NOTFOUND" in cache


def test_installed_node_publishes_to_rclpy(colcon_install, rclpy_node, procs):
    from aerokv.msg import BatteryHealth

    prefix, env = colcon_install
    env = dict(env, LD_LIBRARY_PATH=f"{prefix / 'lib'}:{env['LD_LIBRARY_PATH']}", ROS_DOMAIN_ID=os.environ["ROS_DOMAIN_ID"])
    # The installed launcher finds share/aerokv beside its lib/ directory.
    launch = procs([prefix / "lib/aerokv/aerokv", "launch", "uav.launch.xml", "uav_id:=uav7", "initial_soc:=0.5"], "installed", env=env)
    got = []
    rclpy_node.create_subscription(BatteryHealth, "/uav7/battery", got.append, qos_profile_sensor_data)
    assert spin_until(rclpy_node, lambda: got, timeout=20), launch.output()
    assert got[0].uav_id == "uav7" and abs(got[0].state_of_charge - 0.5) < 0.01
    assert launch.stop() == 0, launch.output()
