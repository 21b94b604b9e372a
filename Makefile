# `make test` is the one test command: it provisions PostgreSQL, then runs formatting, lints and
# the whole suite (unit, conformance on SQLite and PostgreSQL, end-to-end with fault injection).

export CARGO_TARGET_DIR ?= $(HOME)/.cache/meridian-target
export MERIDIAN_TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres

.PHONY: test provision fmt-check clippy unit-and-e2e clean-test-databases run bench

test: provision fmt-check clippy clean-test-databases unit-and-e2e

provision:
	bash tests/provision-postgres.sh
	bash tests/provision-chromium.sh

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

# Test databases are named meridian_t_*; drop the ones earlier runs left behind.
clean-test-databases:
	@if command -v psql >/dev/null 2>&1; then \
	  psql "$(MERIDIAN_TEST_DATABASE_URL)" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'meridian\_t\_%'" \
	  | while read -r db; do psql "$(MERIDIAN_TEST_DATABASE_URL)" -qc "DROP DATABASE IF EXISTS $$db" >/dev/null; done; \
	fi

unit-and-e2e:
	cargo test --workspace --lib --bins --tests

run:
	cargo run --release -- dev

bench:
	cargo bench --bench ingest
	cargo bench --bench agent_tickets
	cargo bench --bench stats_query
	cargo bench --bench appointment_sync
	cargo bench --bench request_transfers
