// Command work-webhook serves Open Cluster Management's ManifestWork admission webhook — the
// released validator, package open-cluster-management.io/ocm/pkg/work/webhook/v1, unchanged,
// with the released 500 KiB manifest limit — as `work webhook-server` does, except that every
// address it listens on is given by a flag. The released command binds its health probe to
// ":8000" and its metrics to ":8080" on every interface, so two test fleets on one machine
// could not run side by side and the test world would listen off loopback.
package main

import (
	"flag"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ocmfeature "open-cluster-management.io/api/feature"
	workv1 "open-cluster-management.io/api/work/v1"
	"open-cluster-management.io/ocm/pkg/features"
	"open-cluster-management.io/ocm/pkg/work/webhook/common"
	webhookv1 "open-cluster-management.io/ocm/pkg/work/webhook/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
)

func main() {
	// As the released `work` command does: the validator consults the hub's work feature gates.
	utilruntime.Must(features.HubMutableFeatureGate.Add(ocmfeature.DefaultHubWorkFeatureGates))
	host := flag.String("host", "127.0.0.1", "address the webhook server listens on")
	port := flag.Int("port", 9443, "port the webhook server listens on")
	certDir := flag.String("certdir", "", "directory with tls.crt and tls.key")
	probe := flag.String("health-probe-bind-address", "0", "health probe address (0: none)")
	limit := flag.Int("manifest-limit", 500*1024, "the largest total size of a work's manifests")
	flag.Parse()

	if err := run(*host, *port, *certDir, *probe, *limit); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(host string, port int, certDir, probe string, limit int) error {
	common.ManifestValidator.WithLimit(limit)
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := workv1.Install(scheme); err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(ctrl.GetConfigOrDie(), ctrl.Options{
		Scheme:                 scheme,
		HealthProbeBindAddress: probe,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		WebhookServer: webhook.NewServer(webhook.Options{
			Host:    host,
			Port:    port,
			CertDir: certDir,
		}),
	})
	if err != nil {
		return err
	}
	if err := (&webhookv1.ManifestWorkWebhook{}).Init(mgr); err != nil {
		return err
	}
	return mgr.Start(ctrl.SetupSignalHandler())
}
