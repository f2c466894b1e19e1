#!/bin/sh
# The compose fleet's trust, made once and kept fresh: the `certs` init service runs this
# before any daemon starts (every Strata service depends on it completing).
#
# - the fleet CA, in the fleet-ca volume (created once; never overwritten);
# - a bundle per daemon and one for the operator, each in its own volume, so a service
#   sees its own key and nobody else's. A bundle is issued when missing and re-issued
#   (`strata certs issue` on an existing bundle renews it, keeping its manifest key) once
#   it is older than CERTS_RENEW_AFTER_DAYS; daemons reload a renewed bundle without a
#   restart, so `docker compose up` again (or a cron'd `docker compose run certs`) rotates;
# - for agents, which enroll themselves: the CA certificate and a bootstrap token
#   (CERTS_TOKEN_USES uses for CERTS_TOKEN_TTL_HOURS), re-made when it is older than half its life.
#
# Every path and name comes from the environment, so the same script runs outside a
# container (tests/test_deploy.py runs it natively). Run as root in compose only to hand
# the fresh volumes to the image's user (CERTS_UID); as anyone else it changes no owner.
set -eu

: "${CERTS_FLEET:?the fleet name}"
: "${CERTS_CA:?the CA directory}"
: "${CERTS_BUNDLES:?the directory holding one bundle directory per service}"
: "${CERTS_ISSUE:?the bundles to keep: role/id=SAN,SAN,... (space separated)}"
: "${CERTS_ENROLL:?where agents find ca.pem and agent.token}"
RENEW_AFTER_DAYS="${CERTS_RENEW_AFTER_DAYS:-10}"
TOKEN_TTL_HOURS="${CERTS_TOKEN_TTL_HOURS:-720}"
TOKEN_USES="${CERTS_TOKEN_USES:-10000}"

fresh() {  # $1 is a file modified less than $2 minutes ago
    [ -f "$1" ] && [ -n "$(find "$1" -mmin "-$2" 2>/dev/null)" ]
}

if [ ! -f "$CERTS_CA/ca.key" ]; then
    strata certs init --fleet "$CERTS_FLEET" --dir "$CERTS_CA"
fi

for spec in $CERTS_ISSUE; do
    identity="${spec%%=*}"
    sans="${spec#*=}"
    role="${identity%%/*}"
    id="${identity#*/}"
    out="$CERTS_BUNDLES/$id"
    if fresh "$out/cert.pem" "$((RENEW_AFTER_DAYS * 1440))"; then
        echo "bundle $identity: current"
        continue
    fi
    set -- --role "$role" --id "$id" --out "$out" --dir "$CERTS_CA"
    if [ "$sans" != "$spec" ] && [ -n "$sans" ]; then
        set -- "$@" --san $(echo "$sans" | tr ',' ' ')
    fi
    strata certs issue "$@"
done

mkdir -p "$CERTS_ENROLL"
cp "$CERTS_CA/ca.pem" "$CERTS_ENROLL/ca.pem.tmp" && mv "$CERTS_ENROLL/ca.pem.tmp" "$CERTS_ENROLL/ca.pem"
if ! fresh "$CERTS_ENROLL/agent.token" "$((TOKEN_TTL_HOURS * 30))"; then
    umask 077  # the token is a secret: readable by the agents' user only
    strata certs token --role agent --ttl "${TOKEN_TTL_HOURS}h" --uses "$TOKEN_USES" \
        --description "compose agents" --dir "$CERTS_CA" > "$CERTS_ENROLL/agent.token.out"
    head -n 1 "$CERTS_ENROLL/agent.token.out" > "$CERTS_ENROLL/agent.token.tmp"
    rm -f "$CERTS_ENROLL/agent.token.out"
    mv "$CERTS_ENROLL/agent.token.tmp" "$CERTS_ENROLL/agent.token"
    echo "agent token: renewed ($TOKEN_USES uses, ${TOKEN_TTL_HOURS}h)"
fi

if [ "$(id -u)" = 0 ] && [ -n "${CERTS_UID:-}" ]; then
    chown -R "$CERTS_UID:$CERTS_UID" "$CERTS_CA" "$CERTS_BUNDLES" "$CERTS_ENROLL"
fi
echo "fleet $CERTS_FLEET: CA and bundles ready"
