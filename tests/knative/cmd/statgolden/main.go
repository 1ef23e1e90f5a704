// Command statgolden prints, in hex, Knative's own protobuf encoding of a fixed
// WireStatMessages frame. The autoscaler plugin's unit test
// (autoscaler-plugin/src/sink.rs, `encoding_matches_knatives_own_bytes`) holds these bytes,
// so the Rust encoding is checked against Knative's gogo-generated code, not against itself.
//
//	cd tests/knative && GOTOOLCHAIN=local GOFLAGS=-mod=mod go run ./cmd/statgolden
package main

import (
	"encoding/hex"
	"fmt"
	"os"

	"knative.dev/serving/pkg/autoscaler/metrics"
)

func main() {
	frame := metrics.WireStatMessages{Messages: []*metrics.WireStatMessage{
		{
			Namespace: "team-a",
			Name:      "resnet-00001",
			Stat: &metrics.Stat{
				PodName:                          "kinfer-autoscaler-plugin",
				AverageConcurrentRequests:        34.99999996500001,
				AverageProxiedConcurrentRequests: 12,
				RequestCount:                     250.5,
				ProxiedRequestCount:              100,
				ProcessUptime:                    0,
				Timestamp:                        0,
			},
		},
		{
			Namespace: "team-b",
			Name:      "llm-00002",
			Stat: &metrics.Stat{
				PodName:                   "kinfer-autoscaler-plugin",
				AverageConcurrentRequests: 7,
				ProcessUptime:             3600.25,
				Timestamp:                 1767225600,
			},
		},
	}}
	b, err := frame.Marshal()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(hex.EncodeToString(b))
}
