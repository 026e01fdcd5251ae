// Command coredns is CoreDNS built with only the plugins the devcluster's cluster DNS needs, using
// CoreDNS's "custom main" pattern: blank-import the plugins and set dnsserver.Directives, instead of
// importing github.com/coredns/coredns/core/plugin, which pulls in every plugin (cloud DNS providers,
// etcd, dnstap, ...).
//
// It has a module of its own (go.mod here) because CoreDNS's dependencies do not follow the pinned
// Kubernetes release; it only talks to the apiserver over its API. The version it prints
// (`coredns -version`) is coremain.CoreVersion, a constant of the CoreDNS module in go.mod.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

// directives lists the plugins above in the order CoreDNS chains them, which is the order of
// CoreDNS's plugin.cfg (core/dnsserver/zdirectives.go) with the others left out. A Corefile may only
// use these.
var directives = []string{
	"bind",        // listen on a given address, e.g. the bridge's 10.210.0.1
	"ready",       // readiness endpoint: 200 once the kubernetes plugin has synced
	"health",      // liveness endpoint
	"errors",      // log errors
	"log",         // query log (for debugging; not in the default Corefile)
	"loadbalance", // shuffle A/AAAA records (headless Services)
	"cache",       // cache answers
	"template",    // answer NXDOMAIN for names outside the cluster: there is no upstream DNS
	"kubernetes",  // Services, EndpointSlices and Pods from the apiserver
	"loop",        // detect forwarding loops (only useful with forward)
	"forward",     // not in the default Corefile (no upstream DNS); cheap, for hosts that have one
}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
