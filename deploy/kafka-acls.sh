#!/usr/bin/env bash
# Kafka ACLs for kflow: which principal may read and write which topic, consumer group and
# transactional id. They are the outer wall; KFLOW_AUTH=on (docs/security.md) is the inner one.
#
#   BOOTSTRAP=kafka:9092 ADMIN_CONFIG=admin.properties PREFIX=kflow. ./deploy/kafka-acls.sh
#
# Needs a broker with an authorizer (authorizer.class.name=org.apache.kafka.metadata.authorizer.
# StandardAuthorizer on KRaft) and SASL or mTLS, so that each process connects as its own user
# (KFLOW_KAFKA_SASL_USERNAME). Principals: User:kflow-engine, -worker, -connector, -trigger,
# -client, -visibility, -subscriptions and -operator. Set DRY_RUN=1 to print the commands.
set -euo pipefail

BOOTSTRAP="${BOOTSTRAP:-localhost:9092}"
PREFIX="${PREFIX:-kflow.}"             # KFLOW_TOPIC_PREFIX
SOURCES="${TRIGGER_SOURCES:-orders-in}" # topics the trigger runner reads (space-separated)
ADMIN=(kafka-acls.sh --bootstrap-server "$BOOTSTRAP")
if [[ -n "${ADMIN_CONFIG:-}" ]]; then ADMIN+=(--command-config "$ADMIN_CONFIG"); fi

# acl USER OPERATIONS RESOURCE-OPTIONS...: allow USER each comma-separated operation on the resource
acl() {
  local user="$1" ops="$2"
  shift 2
  local args=(--add --allow-principal "User:$user")
  local op
  for op in ${ops//,/ }; do args+=(--operation "$op"); done
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "${ADMIN[*]} ${args[*]} $*"
  else
    "${ADMIN[@]}" "${args[@]}" "$@"
  fi
}

# Every process checks, at start-up, that kflow's topics exist with the right configs.
for user in kflow-engine kflow-worker kflow-connector kflow-trigger kflow-client kflow-visibility \
            kflow-subscriptions kflow-operator; do
  acl "$user" Describe,DescribeConfigs --topic "$PREFIX" --resource-pattern-type prefixed
  # assign-only readers (definitions, policies, limits, answers) use groups named kflow-*
  acl "$user" Read --group kflow- --resource-pattern-type prefixed
done

# --- engine: the only writer of instance state; owns the transactions that decide commands
acl kflow-engine Read,Write --topic "${PREFIX}commands"    # reads commands, writes its own (timers, children)
acl kflow-engine Write --topic "${PREFIX}events"
acl kflow-engine Write --topic "${PREFIX}state"            # the public state record
acl kflow-engine Read,Write --topic "${PREFIX}engine-state" # changelog, read back on restore and by standbys
acl kflow-engine Read,Write --topic "${PREFIX}journal"     # changelog of journals and seen token ids
acl kflow-engine Write --topic "${PREFIX}tasks." --resource-pattern-type prefixed
acl kflow-engine Read,Write --topic "${PREFIX}definitions" # hosts code workflows' definitions
acl kflow-engine Read --topic "${PREFIX}policies"
acl kflow-engine Read,Write --topic "${PREFIX}schedules"
acl kflow-engine Read --topic "${PREFIX}limits"
acl kflow-engine Write --topic "${PREFIX}dlq"
acl kflow-engine Write --topic "${PREFIX}audit"
acl kflow-engine Write --topic "${PREFIX}replies"
acl kflow-engine Create --topic "$PREFIX" --resource-pattern-type prefixed
acl kflow-engine Read --group "${PREFIX}engine"
acl kflow-engine Write,Describe --transactional-id "${PREFIX}engine-" --resource-pattern-type prefixed

# --- worker: reads its queues' tasks, reports results (each carries its attempt token)
acl kflow-worker Read --topic "${PREFIX}tasks." --resource-pattern-type prefixed
acl kflow-worker Create --topic "${PREFIX}tasks." --resource-pattern-type prefixed
acl kflow-worker Write --topic "${PREFIX}commands"
acl kflow-worker Write --topic "${PREFIX}dlq"
acl kflow-worker Read --group "${PREFIX}worker." --resource-pattern-type prefixed

# --- connector (kflow connect): a worker of the connector queues; add the topics its Kafka
#     connector operations produce to and read from
acl kflow-connector Read --topic "${PREFIX}tasks." --resource-pattern-type prefixed
acl kflow-connector Create --topic "${PREFIX}tasks." --resource-pattern-type prefixed
acl kflow-connector Write --topic "${PREFIX}commands"
acl kflow-connector Write --topic "${PREFIX}dlq"
acl kflow-connector Read --group "${PREFIX}worker." --resource-pattern-type prefixed

# --- trigger runner (kflow triggers run): reads its sources, starts and signals workflows
for source in $SOURCES; do
  acl kflow-trigger Read --topic "$source"
done
acl kflow-trigger Write --topic "${PREFIX}commands"
acl kflow-trigger Write --topic "${PREFIX}dlq"
acl kflow-trigger Read --group "${PREFIX}triggers"

# --- client (applications, kflow start/signal/...): sends commands, deploys, reads results
acl kflow-client Write --topic "${PREFIX}commands"
acl kflow-client Read,Write --topic "${PREFIX}definitions"
acl kflow-client Read --topic "${PREFIX}state"
acl kflow-client Read --topic "${PREFIX}engine-state"       # status --scan, limit counters
acl kflow-client Read --topic "${PREFIX}events"
acl kflow-client Read --topic "${PREFIX}replies"
acl kflow-client Read --topic "${PREFIX}dlq"               # a dead-lettered start fails its handle at once
acl kflow-client Read --topic "${PREFIX}schedules"

# --- visibility (projection, HTTP API, console): reads the feeds, sends callers' signed actions
acl kflow-visibility Read --topic "${PREFIX}state"
acl kflow-visibility Read --topic "${PREFIX}engine-state"   # the projection: the console shows the engine's state
acl kflow-visibility Read --topic "${PREFIX}events"
acl kflow-visibility Read --topic "${PREFIX}definitions"
acl kflow-visibility Read --topic "${PREFIX}policies"
acl kflow-visibility Read,Write --topic "${PREFIX}audit"
acl kflow-visibility Read --topic "${PREFIX}replies"
acl kflow-visibility Write --topic "${PREFIX}commands"
acl kflow-visibility Read --group kflow-visibility

# --- subscriptions (kflow subscriptions run): webhooks out of the state and events feeds
acl kflow-subscriptions Read --topic "${PREFIX}state"
acl kflow-subscriptions Read --topic "${PREFIX}events"
acl kflow-subscriptions Read,Write --topic "${PREFIX}subscriptions"
acl kflow-subscriptions Write --topic "${PREFIX}dlq"
acl kflow-subscriptions Read --group "${PREFIX}subscriptions"

# --- operator (kflow policy apply, dlq replay, batch, limits, topics ensure): system:Admin work
acl kflow-operator Create --topic "$PREFIX" --resource-pattern-type prefixed
acl kflow-operator Write --topic "${PREFIX}policies"
acl kflow-operator Read,Write --topic "${PREFIX}audit"
acl kflow-operator Write,Describe --transactional-id "${PREFIX}policy-apply"
acl kflow-operator Read --topic "${PREFIX}dlq"
acl kflow-operator Write --topic "${PREFIX}commands"       # dlq replay, re-signed as the operator
acl kflow-operator Write --topic "${PREFIX}tasks." --resource-pattern-type prefixed
acl kflow-operator Read,Write --topic "${PREFIX}batches"
acl kflow-operator Read,Write --topic "${PREFIX}limits"
acl kflow-operator Read,Write --topic "${PREFIX}subscriptions"
acl kflow-operator Read --topic "${PREFIX}state"
acl kflow-operator Read --topic "${PREFIX}engine-state"
acl kflow-operator Read --topic "${PREFIX}events"
acl kflow-operator Read --topic "${PREFIX}replies"
