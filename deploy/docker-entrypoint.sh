#!/bin/sh
# Entry point of every gkd-topk image: load secrets from files, then run the command as PID 1.
#
# TEACHER_API_KEY_FILE=/run/secrets/teacher_api_key (a Compose secret or a mounted Kubernetes
# Secret) exports TEACHER_API_KEY from that file, the variable the trainer reads (see its
# --teacher_api_key_env), so the key is neither baked into the image nor written in a compose file.
# The teacher reads its key file itself (--api-key-file).
set -eu
if [ -n "${TEACHER_API_KEY_FILE:-}" ]; then
    if [ ! -r "$TEACHER_API_KEY_FILE" ]; then
        echo "docker-entrypoint: TEACHER_API_KEY_FILE=$TEACHER_API_KEY_FILE is not a readable file" >&2
        exit 64
    fi
    TEACHER_API_KEY=$(cat "$TEACHER_API_KEY_FILE")
    export TEACHER_API_KEY
fi
exec "$@"
