#!/usr/bin/env bash
# Sourced by the probe_*.sh scripts: step SECS NAME CMD... runs CMD under its own timeout (a
# kernel that hangs costs its step, not the device call), its log in $out/NAME.log, and shows
# the log's result lines (timings, failures, profiles).
step() {
  local secs=$1 name=$2
  shift 2
  timeout "$secs" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -h "µs, \|FAILED\|span\|passed\|failed\|Error" "$out/$name.log" | grep -v "^    [0-9 .]* µs  x"
  [ $rc -eq 124 ] && echo "$name: TIMED OUT after $secs s"
  return $rc
}
