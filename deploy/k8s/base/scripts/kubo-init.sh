#!/bin/sh
# Strata's setup for each Kubo node of the docker-compose fleet. The ipfs/kubo image runs
# every /container-init.d/*.sh after `ipfs init` and before `ipfs daemon`, on every start.
#
# 1. Keep the node off the public network: no bootstrap peers, DHT-only routing (no
#    delegated HTTP routers), no mDNS, no NAT port mapping.
# 2. Peer with the other fleet nodes named in $STRATA_KUBO_PEERS (compose hostnames).
#    Peer IDs are generated at init, so they cannot be written into the config ahead of
#    time: a background loop asks each peer's RPC API (reachable on the compose network
#    only) for its ID and adds it with `ipfs swarm peering add`, which keeps a connection
#    open and re-dials it. The loop repeats so a recreated peer (new ID) is picked up.
#    Only the RPC client is used in the loop (--api), never the repo, so it cannot race
#    the daemon for the repo lock.

ipfs bootstrap rm --all >/dev/null
ipfs config Routing.Type dht
ipfs config --json Discovery.MDNS.Enabled false
ipfs config --json Swarm.DisableNatPortMap true

strata_self_id=$(ipfs config Identity.PeerID)

strata_peer_loop() {
    while true; do
        for host in ${STRATA_KUBO_PEERS:-}; do
            id=$(ipfs --api="/dns4/$host/tcp/5001" id -f='<id>' 2>/dev/null) || continue
            [ -n "$id" ] && [ "$id" != "$strata_self_id" ] || continue
            ipfs --api=/ip4/127.0.0.1/tcp/5001 swarm peering add "/dns4/$host/tcp/4001/p2p/$id" >/dev/null 2>&1 || true
        done
        sleep 10
    done
}

strata_peer_loop </dev/null >/dev/null 2>&1 &
