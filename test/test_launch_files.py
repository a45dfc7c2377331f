"""The launch files are ROS 2 XML launch files whose executables, parameter files and included
files exist."""
import re
import xml.etree.ElementTree as ET

import pytest
from pathlib import Path
from conftest import ROOT

LAUNCH = sorted((ROOT / "launch").glob("*.launch.xml"))
# Elements and attributes of the ROS 2 XML launch format (launch / launch_ros frontends) we use.
SCHEMA = {
    "launch": set(),
    "arg": {"name", "default", "description"},
    "let": {"name", "value"},
    "node": {"pkg", "exec", "name", "namespace", "output", "args", "if", "unless"},
    "param": {"name", "value", "from"},
    "include": {"file"},
    "group": {"scoped", "namespace"},
    "push-ros-namespace": {"namespace"},
}
CARGO_BINS = set(re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text()))
# Other packages' nodes (ros_gz_bridge) must be run dependencies of this package.
EXEC_DEPENDS = {d.text for d in ET.parse(ROOT / "package.xml").getroot() if d.tag in ("exec_depend", "depend")}


def resolve(text, args):
    for _ in range(5):  # defaults may themselves hold substitutions
        text = re.sub(r"\$\(var (\w+)\)", lambda m: args[m.group(1)], text)
        text = text.replace("$(find-pkg-share aerokv)", str(ROOT))
    assert "$(" not in text, f"unresolved substitution in {text}"
    return Path(text)


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_launch_file_is_ros2_launch_xml_and_references_exist(path):
    root = ET.parse(path).getroot()
    assert root.tag == "launch"
    args = {a.get("name"): a.get("default", "") for a in root.iter("arg") if a.get("default") is not None}
    for el in root.iter():
        assert el.tag in SCHEMA, f"{path.name}: <{el.tag}> is not a launch element"
        parent_include = el.tag == "arg" and el.get("value") is not None
        allowed = SCHEMA[el.tag] | ({"value"} if parent_include else set())
        assert set(el.attrib) <= allowed, f"{path.name}: <{el.tag}> has {set(el.attrib) - allowed}"
    for node in root.iter("node"):
        if node.get("pkg") != "aerokv":
            assert node.get("pkg") in EXEC_DEPENDS, f"{path.name}: package {node.get('pkg')} is not in package.xml"
            continue
        assert node.get("exec") in CARGO_BINS, f"{path.name}: no executable {node.get('exec')}"
        for p in node.iter("param"):
            if p.get("from"):
                f = resolve(p.get("from"), args)
                assert f.is_file(), f"{path.name}: missing parameter file {f}"
    for inc in root.iter("include"):
        f = resolve(inc.get("file"), args)
        assert f.is_file(), f"{path.name}: missing include {f}"
        declared = {a.get("name") for a in ET.parse(f).getroot().iter("arg")}
        for a in inc.iter("arg"):
            assert a.get("name") in declared, f"{path.name}: {Path(f).name} declares no arg {a.get('name')}"


def test_parameter_files_are_ros_parameter_files():
    import yaml

    for f in (ROOT / "config").glob("*.yaml"):
        doc = yaml.safe_load(f.read_text())
        for section, body in doc.items():
            assert set(body) == {"ros__parameters"}, f"{f.name}: {section}"
