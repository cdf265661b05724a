# Two commands work on a fresh machine: `make demo` and `make test`.
# Each sets up .venv (torch CPU wheel first, then the project and its extras)
# and the Debian packages the tests need, then runs.
PY      := .venv/bin/python
STAMP   := .venv/.framekv-installed
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP) /usr/bin/ffmpeg /usr/bin/jq /usr/bin/chromium /usr/bin/chromedriver

# Debian packages: the binary's name, except chromedriver (package chromium-driver);
# chromium and its driver drive the web page's test (tests/test_serve_page.py)
APT_PACKAGE = $(if $(filter chromedriver,$(notdir $@)),chromium-driver,$(notdir $@))
/usr/bin/ffmpeg /usr/bin/jq /usr/bin/chromium /usr/bin/chromedriver:
	@command -v $(notdir $@) >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(APT_PACKAGE); \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $(APT_PACKAGE); fi; }

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: setup
	$(PY) -m jobs.demo

# two pytest workers, a test file each at a time (module fixtures stay in one process):
# most of the suite waits on processes, Ray and moto, so two files share the 2 cores
test: setup
	$(PY) -m pytest -q -ra -n 2 --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -ra -n 2 --dist loadfile -m 'not slow'

bench: setup
	$(PY) -m bench.decode
	$(PY) -m bench.cache
	$(PY) -m bench.query
	$(PY) -m bench.ingest
	$(PY) -m bench.needle
	$(PY) -m bench.library
	$(PY) -m bench.generate
	$(PY) -m bench.serve

clean:
	rm -rf demo-index demo-archive bench/scratch
