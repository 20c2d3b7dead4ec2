"""How a client talks to the local Nova + Neutron + Cinder of scripts/nova/nova.sh - ONE openstack.connect.

No Keystone anywhere. Every service takes the identity from ``X-Auth-Token: user:project`` (user "admin"
is admin): nova-api and neutron through the noauth paste filter of shims/xms_nova_shims/noauth.py,
placement through its own noauth2, Cinder through ``noauth_include_project_id``. Cinder answers any
request *without* that header - including keystoneauth's version-discovery GETs, which are sent
unauthenticated - with a fake "204 No Content", so the header goes into the session's
``additional_headers`` (every request), not only into the auth plugin. The per-service endpoints come
from ``<service>_endpoint_override`` (there is no catalog).
"""

from __future__ import annotations

import os

import openstack
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint

DEFAULT_DIR = "/var/tmp/xms-nova"
DEFAULT_PROJECT = "0123456789abcdef0123456789abcdef"


def connect_from_clouds_yaml(cloud: str = "xms-nova", clouds_yaml: str | None = None) -> openstack.connection.Connection:
    """openstacksdk from the clouds.yaml that `nova.sh env` writes, plus the header on every request."""
    path = clouds_yaml or os.path.join(os.environ.get("XMS_NOVA_DIR", DEFAULT_DIR), "clouds.yaml")
    config = openstack.config.OpenStackConfig(config_files=[path])
    conn = openstack.connection.Connection(config=config.get_one(cloud=cloud))
    # before the first request (the proxies discover versions lazily)
    conn.session.additional_headers["X-Auth-Token"] = conn.config.config["auth"]["token"]
    return conn


def connect_with_session(project: str = DEFAULT_PROJECT, host: str = "127.0.0.1", nova_port: int = 8774,
                         neutron_port: int = 9696, cinder_port: int = 8776) -> openstack.connection.Connection:
    """The same without clouds.yaml: an explicit keystoneauth session."""
    token = f"admin:{project}"
    compute = f"http://{host}:{nova_port}/v2.1"
    sess = ks_session.Session(auth=token_endpoint.Token(endpoint=compute, token=token),
                              additional_headers={"X-Auth-Token": token})
    return openstack.connection.Connection(
        session=sess,
        compute_endpoint_override=compute,
        network_endpoint_override=f"http://{host}:{neutron_port}",
        block_storage_endpoint_override=f"http://{host}:{cinder_port}/v3/{project}",
        block_storage_api_version="3",
    )
