"""The studio service: `portrait serve`, an HTTP API and a web UI over the durable job store.

Why a layer of its own: the service is one more front door, like the CLI. It owns what only a
multi-customer server needs (tenants and their tokens, upload screening, which job belongs to
whom, where a tenant's files live) and calls the same library for everything else: prepare
(portrait.flows.prepare), training and generation as items in the studio store, run by the
same executor and the same `perform` as `portrait batch`.

policy.py    upload limits and worker settings (`service` section of a preset)
tenants.py   the service database: tenants, hashed tokens, identities and jobs per tenant
uploads.py   screening uploaded files and zips: size, count, pixels, content sniffing, zip safety
service.py   `StudioService`: the verbs the API and the UI call
workers.py   worker processes that take items from the store for as long as the server runs
app.py       the FastAPI app: /v1 API, /docs, /healthz and the web UI (static/)
server.py    starts the workers and uvicorn (`portrait serve`)

Layering: imports core, stages, flows and studio; nothing below imports it.
"""
