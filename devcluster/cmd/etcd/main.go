// Command etcd is the devcluster datastore: upstream etcd's own main, built at the
// version that the pinned Kubernetes release tests against (see go.mod).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
