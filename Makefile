# Everything needs only python3 (3.11+) and make: the venv is built from requirements.lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum requirements.lock | cut -d' ' -f1)

.PHONY: run test demo node clients lint fmt migrate bench profile lock clean cluster\
	cluster-down cluster-test

# Python 3.11 or newer, checked before anything is made: an older one leaves no .venv behind.
NEED_311 = import sys; sys.exit(sys.version_info < (3, 11))

$(STAMP): requirements.lock
	@if ! test -x $(BIN)/python; then \
		$(PYTHON) -c '$(NEED_311)' 2>/dev/null || { echo "surge needs Python 3.11 or newer;" \
			"$(PYTHON) is $$($(PYTHON) -V 2>&1 || echo missing): make PYTHON=python3.11 ..." >&2; exit 1; }; \
		echo "==> creating $(VENV) with $$($(PYTHON) -V) (a few seconds)"; \
		$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }; \
	elif ! $(BIN)/python -c '$(NEED_311)'; then \
		echo "$(VENV) has $$($(BIN)/python -V); surge needs 3.11 or newer: make clean, then" \
			"make PYTHON=python3.11 ..." >&2; exit 1; \
	fi
	@echo "==> installing requirements.lock into $(VENV), hash-checked (1-3 minutes the first" \
		"time, seconds after)"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	@rm -f $(VENV)/.installed-* && touch $@
	@echo "==> $(VENV) is ready"

run: $(STAMP)  ## serve on HOST:PORT (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL)
	@echo "==> starting: embedded PostgreSQL and Redis under .surge/ unless DATABASE_URL/REDIS_URL" \
		"are set, migrations, then the server (a few seconds; ~20 s the very first time)"
	$(BIN)/python -m server serve

test: $(STAMP) node  ## the whole suite (what CI runs)
	$(BIN)/python -m pytest -q

demo: $(STAMP)  ## with `make run` serving: a demo tenant (users, products, orders, events) and its login
	$(BIN)/python -m server demo

# The Node tools the suite runs (Redocly CLI lints /openapi.json; the TypeScript client's
# tools), exactly as tests/node/package-lock.json pins them; again whenever the lock changes.
# Without npm, a notice: the tests that need them skip, or fail under CI.
NODE_STAMP := tests/node/node_modules/.installed
node: $(NODE_STAMP)
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		echo "==> npm ci --prefix tests/node (the lock's Node tools; half a minute the first time)"; \
		npm ci --prefix tests/node --ignore-scripts --no-audit --no-fund --loglevel=error \
			&& touch $@; \
	else \
		echo "npm is missing (Debian: apt-get install nodejs npm): tests/node's tools are not" \
			"installed, and the tests that need them will say so" >&2; \
	fi

# URL=http://host:port reads a running server's /openapi.json; without, create_app's (the same).
clients: $(STAMP) node  ## typed Python and TypeScript clients under clients/ from /openapi.json
	$(BIN)/python -m tests.clients.generate --out clients $(if $(URL),--url $(URL))

migrate: $(STAMP)
	$(BIN)/python -m server migrate

bench: $(STAMP)  ## Surge vs bare aiohttp+asyncpg vs FastAPI+SQLAlchemy vs Go, side by side, then overload (~25 min)
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v go >/dev/null 2>&1 || apt-get install -y -qq golang-go golang-github-jackc-pgx-v4-dev \
		|| echo "no Go peer: Debian's golang-go and golang-github-jackc-pgx-v4-dev did not install"
	$(BIN)/python -m bench.seed
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.soak  # RSS over 60 s under load: <= 100 MB, <= 5 % growth
	$(CLUSTER_INSTALL)  # HAProxy: the overload bench's edge mode
	$(BIN)/python -m bench.overload --cpu-quota 0.2 --edge-maxconn 10  # 1x-10x: docs/PERFORMANCE.md

profile: $(STAMP)  ## py-spy flame graph of Surge under load: docs/profile-user.svg
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
	@test -f bench/data/ids.json || $(BIN)/python -m bench.seed
	$(BIN)/python -m bench.profile --endpoint user

# HAProxy and PgBouncer from Debian's packages, installed when missing (as `make bench` does for
# wrk); root's PATH has /usr/sbin, another user's may not, so both places count.
CLUSTER_PROGRAMS = for p in haproxy pgbouncer; do \
	command -v $$p >/dev/null 2>&1 || test -x /usr/sbin/$$p || echo $$p; done
define CLUSTER_INSTALL
	@missing="$$($(CLUSTER_PROGRAMS))"; test -z "$$missing" \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; }
endef

cluster: $(STAMP)  ## PostgreSQL primary + replica, PgBouncer, Redis, 3 Surge replicas behind HAProxy, here (bench/cluster.py)
	$(CLUSTER_INSTALL)
	$(BIN)/python -m bench.cluster up

cluster-down: $(STAMP)  ## stop what `make cluster` started
	$(BIN)/python -m bench.cluster down

cluster-test: $(STAMP)  ## a cluster of its own under faults for 3 min: rolling restart, SIGKILL, replay pause, PgBouncer, Redis
	$(CLUSTER_INSTALL)
	$(BIN)/python -m bench.cluster test

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pip's installation report names each resolved file with its sha256: a lock with hashes, made
# by pip alone. Each pin carries the hash of the file pip chose for this platform (Linux x86_64,
# CPython 3.11: CI's, the image's). Two sections: the runtime closure (what the image installs)
# first, then what only the dev and bench extras add.
define LOCK_FROM_REPORTS
import json, sys
def pins(path):
    found = {}
    for item in json.load(open(path))["install"]:
        meta, archive = item["metadata"], item["download_info"].get("archive_info", {})
        if meta["name"] != "surge":
            digest = archive.get("hashes", {}).get("sha256") or archive.get("hash", "").partition("=")[2]
            if not digest:
                sys.exit(f"make lock: pip's report has no sha256 for {meta['name']}")
            found[meta["name"]] = (meta["version"], digest)
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))
every = pins(sys.argv[1])
if len(sys.argv) == 2:  # the pins alone: constraints for resolving the runtime closure
    print("\n".join(f"{name}=={version}" for name, (version, _) in every.items()))
    sys.exit()
runtime = pins(sys.argv[2]).keys()
print("# Made by `make lock` from pyproject.toml; do not edit. pip installs it hash-checked.")
for title, names in (("runtime", [n for n in every if n in runtime]),
                     ("dev and bench extras", [n for n in every if n not in runtime])):
    print(f"# --- {title} ---")
    for name in names:
        print(f"{name}=={every[name][0]} \\\n    --hash=sha256:{every[name][1]}")
endef
export LOCK_FROM_REPORTS
RESOLVE = .lockenv/bin/python -m pip install --quiet --disable-pip-version-check --dry-run \
	--ignore-installed

lock:  ## re-resolve pyproject.toml and its extras into requirements.lock, each pin with its sha256
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	$(RESOLVE) --report .lockenv/all.json '.[dev,bench]' $(LOCK_ARGS)
	.lockenv/bin/python -c "$$LOCK_FROM_REPORTS" .lockenv/all.json > .lockenv/pins.txt
	$(RESOLVE) --report .lockenv/runtime.json . -c .lockenv/pins.txt
	.lockenv/bin/python -c "$$LOCK_FROM_REPORTS" .lockenv/all.json .lockenv/runtime.json \
		> .lockenv/requirements.lock
	mv .lockenv/requirements.lock requirements.lock && rm -rf .lockenv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
