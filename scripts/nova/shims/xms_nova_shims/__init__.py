"""Test-only glue for scripts/nova/nova.sh: noauth paste filter, agentless ML2 mechanism driver, WSGI runner."""
