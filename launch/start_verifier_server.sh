#!/usr/bin/env bash
# Serve the frozen verifier (OpenAI-compatible, served name "verifier"); see _serve.sh for flags and environment.
exec "$(dirname "${BASH_SOURCE[0]}")/_serve.sh" verifier "$@"
