"""How a client talks to the local Cinder of scripts/cinder/cinder.sh (auth_strategy = noauth_include_project_id).

There is no Keystone. Cinder's noauth middleware takes the project from the header
``X-Auth-Token: admin:<project>`` (user "admin", always is_admin) and answers any request *without*
that header with a fake "204 No Content" - including keystoneauth's version-discovery GETs, which
keystoneauth sends unauthenticated. So the header must be on every request: it goes into the
keystoneauth session's ``additional_headers``, not only into the auth plugin.

Two equivalent ways, both checked by smoke.py:

* ``connect_from_clouds_yaml()``: ``openstack.connect(cloud="xms-dev")`` with the clouds.yaml that
  ``cinder.sh env`` writes (auth_type admin_token), then the header added to ``conn.session`` before
  the first request.
* ``connect_with_session()``: an explicit keystoneauth ``token_endpoint.Token`` session with
  ``additional_headers`` and ``block_storage_endpoint_override``.
"""

from __future__ import annotations

import os

import openstack
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint

DEFAULT_DIR = "/var/tmp/xms-cinder"
DEFAULT_PROJECT = "0123456789abcdef0123456789abcdef"


def connect_from_clouds_yaml(
    cloud: str = "xms-dev", clouds_yaml: str | None = None
) -> openstack.connection.Connection:
    """openstacksdk from clouds.yaml (auth_type admin_token), plus the header on every request."""
    path = clouds_yaml or os.path.join(os.environ.get("XMS_CINDER_DIR", DEFAULT_DIR), "clouds.yaml")
    config = openstack.config.OpenStackConfig(config_files=[path])
    conn = openstack.connection.Connection(config=config.get_one(cloud=cloud))
    # Must happen before the first request (the block_storage proxy discovers versions lazily).
    conn.session.additional_headers["X-Auth-Token"] = conn.config.config["auth"]["token"]
    return conn


def connect_with_session(
    endpoint: str = "http://127.0.0.1:8776", project: str = DEFAULT_PROJECT
) -> openstack.connection.Connection:
    """openstacksdk on an explicit keystoneauth session (no clouds.yaml)."""
    token = f"admin:{project}"
    url = f"{endpoint.rstrip('/')}/v3/{project}"
    auth = token_endpoint.Token(endpoint=url, token=token)
    sess = ks_session.Session(auth=auth, additional_headers={"X-Auth-Token": token})
    return openstack.connection.Connection(
        session=sess,
        block_storage_endpoint_override=url,
        block_storage_api_version="3",
    )
