#!/usr/bin/env bash
# Turn a cloud's spot/preemption notice into Ray's drain of this node, so that an elastic vitpipe
# pretraining checkpoints at once and carries on without it (README: elastic pretraining). Started in the
# background on every worker node after `ray start` (cluster/aws.yaml, cluster/gcp.yaml):
#
#   spot-notice.sh aws    # EC2: polls the instance metadata for a spot interruption (2 minutes' notice)
#   spot-notice.sh gcp    # GCE: waits on the metadata server's `preempted` flag (30 seconds' notice)
#
# It drains once, with the time the cloud gives as the deadline, and exits; Ray Train sees the drain and
# vitpipe's workers checkpoint the step they are on.
set -uo pipefail
CLOUD=${1:?usage: spot-notice.sh aws|gcp}

drain() {  # $1: seconds until the node goes, $2: why
  ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "$2" --deadline-remaining-seconds "$1"
}

case "$CLOUD" in
  aws)
    metadata=http://169.254.169.254/latest
    while true; do
      token=$(curl -sf -m 2 -X PUT "$metadata/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 60")
      if curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" "$metadata/meta-data/spot/instance-action" >/dev/null; then
        drain 110 "EC2 spot interruption notice"
        exit
      fi
      sleep 5
    done
    ;;
  gcp)
    url="http://metadata.google.internal/computeMetadata/v1/instance/preempted?wait_for_change=true"
    while true; do
      if [ "$(curl -sf -H 'Metadata-Flavor: Google' "$url")" = "TRUE" ]; then
        drain 25 "GCE preemption notice"
        exit
      fi
      sleep 1
    done
    ;;
  *)
    echo "spot-notice.sh: unknown cloud '$CLOUD' (aws or gcp)" >&2
    exit 2
    ;;
esac
