# Everything needs only python3 (3.11+) and make: the venv is built from requirements.lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum requirements.lock | cut -d' ' -f1)

.PHONY: run test lint fmt migrate bench profile lock clean

$(STAMP): requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	@rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)  ## serve on HOST:PORT (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL)
	$(BIN)/python -m server serve

test: $(STAMP)  ## the whole suite (what CI runs)
	$(BIN)/python -m pytest -q

migrate: $(STAMP)
	$(BIN)/python -m server migrate

bench: $(STAMP)  ## Surge vs bare aiohttp+asyncpg vs FastAPI+SQLAlchemy vs Go, side by side, then overload (~25 min)
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v go >/dev/null 2>&1 || apt-get install -y -qq golang-go golang-github-jackc-pgx-v4-dev \
		|| echo "no Go peer: Debian's golang-go and golang-github-jackc-pgx-v4-dev did not install"
	$(BIN)/python -m bench.seed
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.soak  # RSS over 60 s under load: <= 100 MB, <= 5 % growth
	$(BIN)/python -m bench.overload  # 1x-10x load, adaptive vs fixed limit: docs/PERFORMANCE.md

profile: $(STAMP)  ## py-spy flame graph of Surge under load: docs/profile-user.svg
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
	@test -f bench/data/ids.json || $(BIN)/python -m bench.seed
	$(BIN)/python -m bench.profile --endpoint user

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lock:  ## re-resolve pyproject.toml's dependencies into requirements.lock
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install --quiet --disable-pip-version-check '.[dev,bench]'
	.lockenv/bin/python -m pip freeze --exclude surge > requirements.lock
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
