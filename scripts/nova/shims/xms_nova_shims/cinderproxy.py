"""Nova's way to Cinder: a pass-through proxy standing in for keystonemiddleware's service-token check.

Cinder (auth_strategy noauth_include_project_id, scripts/cinder) lets a caller delete an attachment that
is connected to a server only if the request "comes from a service" (cinder.volume.api
is_service_request, bug #2004555: the context's service_roles contain "service"), or if it can ask Nova
itself - which needs Keystone. With Keystone, nova's [service_user] send_service_user_token adds an
X-Service-Token, keystonemiddleware validates it and sets X-Service-Roles. Cinder's noauth middleware
builds its context with oslo.context's from_environ, which reads X-Service-Roles; so this proxy does the
keystonemiddleware part: requests that carry X-Service-Token get "X-Service-Roles: service", any
X-Service-Roles a caller sent itself is dropped. Everything else is passed through unchanged.

Without it nova-compute's attachment_delete on server delete gets HTTP 500 from Cinder
("EndpointNotFound" while Cinder looks for Keystone to ask Nova), nova ignores that, and the volumes stay
"in-use", attached to a deleted server. Only nova uses this proxy ([cinder] endpoint_template); clients
talk to Cinder directly.
"""
import http.client
import os
import urllib.parse

_TARGET = urllib.parse.urlsplit(os.environ.get("XMS_NOVA_CINDER_TARGET", "http://127.0.0.1:8776"))
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


def application(environ, start_response):
    headers = {}
    for k, v in environ.items():
        if k.startswith("HTTP_"):
            name = k[5:].replace("_", "-").title()
            if name.lower() not in _HOP and name.lower() != "x-service-roles":
                headers[name] = v
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    if headers.get("X-Service-Token"):
        headers["X-Service-Roles"] = "service"
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else None
    path = environ.get("RAW_URI") or (urllib.parse.quote(environ.get("PATH_INFO", "")) +
                                      ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else ""))
    conn = http.client.HTTPConnection(_TARGET.hostname, _TARGET.port or 80, timeout=300)
    try:
        conn.request(environ["REQUEST_METHOD"], path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    out = [(k, v) for k, v in r.getheaders() if k.lower() not in _HOP]
    out.append(("Content-Length", str(len(data))))
    start_response(f"{r.status} {r.reason}", out)
    return [data]
