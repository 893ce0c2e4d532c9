// The upstream Gateway API conformance suite as a test binary of our own module (go test -c):
// all flags (-gateway-class, -conformance-profiles, -report-output, ...) are the suite's own
// (sigs.k8s.io/gateway-api/conformance/utils/flags). Run by tools/conformance/run.py.
package conformance_test

import (
	"testing"

	"sigs.k8s.io/gateway-api/conformance"
)

func TestConformance(t *testing.T) {
	conformance.RunConformance(t)
}
