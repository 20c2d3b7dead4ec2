"""Paste filter standing in for keystonemiddleware's auth_token (no Keystone here).

The token is "user:project" - the same convention as Cinder's noauth_include_project_id - and is turned
into the headers auth_token would have set, so the services' own keystone-context middleware (nova's
NovaKeystoneContext, neutron's NeutronKeystoneContext) builds the request context. User "admin" (or "admin-<anything>") gets the
roles admin,member,reader; anyone else member,reader. The token itself stays in X-Auth-Token, so Nova
forwards it to Cinder unchanged ("admin:<project>" is what Cinder's noauth middleware understands).
Test use only: it trusts whatever the caller claims.
"""
import json

_IDENTITY = ("HTTP_X_IDENTITY_STATUS", "HTTP_X_SERVICE_IDENTITY_STATUS", "HTTP_X_USER_ID", "HTTP_X_USER",
             "HTTP_X_USER_NAME", "HTTP_X_PROJECT_ID", "HTTP_X_PROJECT_NAME", "HTTP_X_TENANT_ID",
             "HTTP_X_TENANT", "HTTP_X_TENANT_NAME", "HTTP_X_ROLES", "HTTP_X_ROLE", "HTTP_X_SERVICE_ROLES",
             "HTTP_X_USER_DOMAIN_ID", "HTTP_X_PROJECT_DOMAIN_ID", "HTTP_X_SYSTEM_SCOPE",
             "HTTP_X_SERVICE_CATALOG", "HTTP_OPENSTACK_SYSTEM_SCOPE")


class NoAuth:
    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        for k in _IDENTITY:
            environ.pop(k, None)
        token = environ.get("HTTP_X_AUTH_TOKEN") or ""
        if not token:
            body = json.dumps({"error": {"code": 401, "title": "Unauthorized",
                                         "message": "X-Auth-Token 'user:project' required"}}).encode()
            start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                                ("Content-Length", str(len(body)))])
            return [body]
        user, _sep, project = token.partition(":")
        project = project or user
        # "admin" and "admin-<anything>" (a test can keep a secret in the user part) are admin
        roles = "admin,member,reader" if user == "admin" or user.startswith("admin-") else "member,reader"
        environ.update({
            "HTTP_X_IDENTITY_STATUS": "Confirmed",
            "HTTP_X_USER_ID": user, "HTTP_X_USER_NAME": user, "HTTP_X_USER_DOMAIN_ID": "default",
            "HTTP_X_PROJECT_ID": project, "HTTP_X_PROJECT_NAME": project,
            "HTTP_X_PROJECT_DOMAIN_ID": "default", "HTTP_X_ROLES": roles,
        })
        return self.app(environ, start_response)


def filter_factory(global_conf, **local_conf):
    return NoAuth
