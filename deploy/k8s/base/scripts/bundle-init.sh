#!/bin/sh
# Init container of every Strata daemon in deploy/k8s: copies the pod's bundle(s) out of
# a Secret volume into a private in-memory directory.
#
#   bundle-init.sh SECRET_DIR ID OUT_DIR [ID OUT_DIR ...]
#
# A Secret holds each bundle flattened, one key per file: <id>.ca.pem, <id>.cert.pem,
# <id>.key.pem, <id>.manifest.key (so one Secret serves a whole StatefulSet, and each pod
# takes its own by its name). The copy is needed because a Secret volume's files are
# group-readable under the pod's fsGroup, and a bundle's private files must be 0600.
#
# With CA_SECRET and CA_DIR set (the coordinator), the fleet CA is also copied from its
# Secret to CA_DIR (persistent storage) once, when CA_DIR holds no CA yet: from then on
# the coordinator's copy is the live one (token uses, revocations).
set -eu

secrets="${1:?the Secret volume holding <id>.<file> keys}"
shift
umask 077
while [ "$#" -ge 2 ]; do
    id="$1" out="$2"
    shift 2
    mkdir -p "$out"
    for file in ca.pem cert.pem key.pem manifest.key; do
        cp "$secrets/$id.$file" "$out/$file.tmp"
        chmod 600 "$out/$file.tmp"
        mv "$out/$file.tmp" "$out/$file"
    done
    echo "bundle $id: $out"
done

if [ -n "${CA_SECRET:-}" ] && [ -n "${CA_DIR:-}" ]; then
    if [ -f "$CA_DIR/ca.key" ]; then
        echo "fleet CA: kept $CA_DIR"
    else
        mkdir -p "$CA_DIR"
        cp "$CA_SECRET"/* "$CA_DIR"/
        chmod 600 "$CA_DIR"/*  # the coordinator writes its databases; nobody else reads the key
        echo "fleet CA: copied to $CA_DIR"
    fi
fi
