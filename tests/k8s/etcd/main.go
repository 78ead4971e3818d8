// Command etcd is the etcd server, built from the pinned go.etcd.io/etcd release
// for the Trellis test cluster (see ../build.sh). It lives in its own module so
// etcd's dependency graph never meets Kubernetes'.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
