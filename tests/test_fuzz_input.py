"""Fuzzed input (hypothesis): every migration request and every config file is either valid or
refused with one line naming the problem — never an unexpected exception."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xms.client import build_request
from xms.config import load_config
from xms.errors import ConfigInvalid, InvalidRequest
from xms.models import NAME_RE

scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=24)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=8)
names = st.from_regex(NAME_RE, fullmatch=True)
request_fields = st.fixed_dictionaries({}, optional={
    "name": names | values, "project": names | values, "volume_type": names | values,
    "disks": st.lists(st.text(max_size=40) | st.just("/tmp/disk.qcow2"), max_size=4) | values,
    "availability_zone": st.none() | st.text(max_size=10) | values,
    "mode": st.sampled_from(["cold", "warm"]) | values,
    "sync_interval_s": st.integers(-5, 10**7) | values,
    "cutover_at": st.none() | st.datetimes() | st.text(max_size=30) | values,
    "bitmap": st.none() | names | values, "power_off_hook": st.none() | names | values,
    "snapshot": st.booleans() | values, "heartbeat_timeout_s": st.integers(-5, 10**5) | values,
})


def one_line(e: Exception) -> bool:
    return bool(str(e)) and "\n" not in str(e)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_fields)
def test_requests_are_valid_or_refused_with_one_line(fields):
    try:
        req = build_request(**fields)
    except InvalidRequest as e:
        assert one_line(e), repr(str(e))
        return
    assert NAME_RE.match(req.name) and NAME_RE.match(req.project) and req.disks
    assert req.mode in ("cold", "warm") and req.sync_interval_s >= 1 and req.heartbeat_timeout_s >= 2
    assert req.cutover_at is None or req.cutover_at.tzinfo is not None


base = yaml.safe_load(open(__file__.replace("tests/test_fuzz_input.py", "xms/defaults/config.yaml")))
configs = st.fixed_dictionaries({}, optional={
    "backends": values | st.just(base["backends"]), "volume_types": values | st.just(base["volume_types"]),
    "quotas": values | st.just(base["quotas"]), "hooks": values, "extra": values,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs | values)
def test_configs_are_valid_or_refused_with_one_line(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        cfg = load_config(path)
    except ConfigInvalid as e:
        assert one_line(e) and str(path) in str(e), repr(str(e))
        return
    for t in cfg.all_volume_types():  # a config that loads is usable
        assert t.backend in cfg.backends and t.granularity_gib >= 1


def test_bad_settings_are_refused_with_one_line_naming_the_variable(tmp_path):
    """A bad XMS_* variable: one line with its name and what is allowed, exit 1, and never the
    value (it could be the payload key)."""
    import os
    import subprocess
    import sys

    for var, value, allowed in (("XMS_COPY_BUFFER_MIB", "2", "greater than or equal to 8"),
                                ("XMS_COPY_BUFFER_MIB", "lots", "valid integer"),
                                ("XMS_TARGET", "s3-secret-thing", "'local' or 'openstack'")):
        r = subprocess.run([sys.executable, "-m", "xms", "list"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "XMS_DATA_DIR": str(tmp_path), var: value})
        assert r.returncode == 1, r
        line = r.stderr.strip()
        assert "\n" not in line and line.startswith(f"xms: error: {var}: ") and allowed in line, line
        assert value not in line
