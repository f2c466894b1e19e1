#!/bin/sh
# The Kubernetes fleet's trust, as Secret manifests on stdout (progress on stderr):
#
#   deploy/k8s/secrets.sh | kubectl apply -f -
#
# It runs deploy/config/certs-init.sh (the docker-compose fleet's `certs` step, the same
# script) against a CA kept on this machine in $CA_STATE (default ./strata-k8s-ca: keep it
# safe, it holds the CA key), then prints:
#
#   strata-fleet-ca         the CA directory: the coordinator copies it onto its volume on
#                           first start (enrollment signs with it and counts token uses)
#   strata-tls-coordinator  the coordinator's bundle   (keys coordinator.<file>)
#   strata-tls-aggregators  one bundle per aggregator  (keys agg-N.<file>, N < AGGREGATORS)
#   strata-tls-relay        the relay's bundle         (keys relay.<file>)
#   strata-tls-operator     an operator bundle, mounted in the coordinator's pod for the CLI
#   strata-enroll           ca.pem and agent.token: agents enroll with them
#
# Like certs-init.sh it is idempotent: run again, it re-issues only bundles older than 10
# days (and the agents' token past half its life) and prints the same Secrets otherwise;
# apply, then `kubectl rollout restart` the daemons to load renewed bundles.
#
# Each serving bundle names the DNS names the others dial it by, in $NAMESPACE:
# coordinator, agg-N.agg (and the Service `agg`, which agents seed from), relay; plus
# localhost for the probes. EXTRA_SANS adds names or addresses, e.g. a LoadBalancer's:
#   EXTRA_SANS="coordinator=203.0.113.7 agg-0=agg-0.example.org"
set -eu

NAMESPACE="${NAMESPACE:-strata}"
AGGREGATORS="${AGGREGATORS:-3}"
FLEET="${FLEET:-k8s}"
CA_STATE="${CA_STATE:-./strata-k8s-ca}"
EXTRA_SANS="${EXTRA_SANS:-}"
KUBECTL="${KUBECTL:-kubectl}"
here="$(cd "$(dirname "$0")" && pwd)"
certs_init="${CERTS_INIT:-$here/../config/certs-init.sh}"

# the DNS names of a Service `$1` (and of a pod `$2` under it, if given) in the namespace
names() {
    host="${2:+$2.}$1"
    echo "$host,$host.$NAMESPACE.svc,$host.$NAMESPACE.svc.cluster.local"
}
extra() {  # EXTRA_SANS entries of id $1, comma-prefixed
    for entry in $EXTRA_SANS; do
        [ "${entry%%=*}" = "$1" ] && printf ',%s' "${entry#*=}"
    done
    return 0
}

issue="coordinator/coordinator=$(names coordinator),coordinator.$NAMESPACE,localhost,127.0.0.1$(extra coordinator)"
aggregators=""
n=0
while [ "$n" -lt "$AGGREGATORS" ]; do
    id="agg-$n"
    aggregators="$aggregators $id"
    issue="$issue aggregator/$id=$(names agg "$id"),$(names agg),localhost,127.0.0.1$(extra "$id")"
    n=$((n + 1))
done
issue="$issue relay/relay=$(names relay),localhost,127.0.0.1$(extra relay) operator/operator"

CERTS_FLEET="$FLEET" CERTS_CA="$CA_STATE/ca" CERTS_BUNDLES="$CA_STATE/bundles" \
    CERTS_ENROLL="$CA_STATE/enroll" CERTS_ISSUE="$issue" CERTS_TOKEN_USES="${TOKEN_USES:-10000}" \
    sh "$certs_init" >&2

secret() {  # name, then kubectl --from-file arguments
    name="$1"
    shift
    echo "---"
    "$KUBECTL" create secret generic "$name" --namespace "$NAMESPACE" --dry-run=client -o yaml "$@"
}
bundle_files() {  # --from-file=<id>.<file>=<path> for each bundle id given
    for id in "$@"; do
        for file in ca.pem cert.pem key.pem manifest.key; do
            printf -- '--from-file=%s.%s=%s\n' "$id" "$file" "$CA_STATE/bundles/$id/$file"
        done
    done
}

# the CA directory's files (key, certificate, issued and token databases, revocations)
secret strata-fleet-ca --from-file="$CA_STATE/ca"
# shellcheck disable=SC2046  # one argument per line, paths without spaces
secret strata-tls-coordinator $(bundle_files coordinator)
# shellcheck disable=SC2046,SC2086
secret strata-tls-aggregators $(bundle_files $aggregators)
# shellcheck disable=SC2046
secret strata-tls-relay $(bundle_files relay)
# shellcheck disable=SC2046
secret strata-tls-operator $(bundle_files operator)
secret strata-enroll --from-file=ca.pem="$CA_STATE/enroll/ca.pem" --from-file=agent.token="$CA_STATE/enroll/agent.token"
