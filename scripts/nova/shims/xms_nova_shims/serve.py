"""Serve a WSGI entry-point module with gunicorn (no nova-api/neutron-server/placement-api scripts exist
any more; the services ship only WSGI modules).

    python -m xms_nova_shims.serve NAME MODULE HOST:PORT [THREADS]

NAME becomes sys.argv[0] (oslo.config reads sys.argv[1:] in neutron's entry point, so it must be empty).
Config files come from the services' own env vars (OS_NOVA_CONFIG_DIR, OS_NEUTRON_CONFIG_DIR/_FILES,
OS_PLACEMENT_CONFIG_DIR).
"""
import importlib
import sys

from gunicorn.app.base import BaseApplication


class _App(BaseApplication):
    def __init__(self, module, bind, threads):
        self.module, self.bind, self.threads = module, bind, threads
        super().__init__()

    def load_config(self):
        self.cfg.set("bind", [self.bind])
        self.cfg.set("workers", 1)
        self.cfg.set("worker_class", "gthread")
        self.cfg.set("threads", self.threads)
        self.cfg.set("timeout", 300)
        self.cfg.set("graceful_timeout", 5)
        self.cfg.set("accesslog", None)
        self.cfg.set("proc_name", sys.argv[0])

    def load(self):
        return importlib.import_module(self.module).application


def main():
    name, module, bind = sys.argv[1:4]
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    sys.argv = [name]
    _App(module, bind, threads).run()


if __name__ == "__main__":
    main()
