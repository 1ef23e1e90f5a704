// Command kinfer-knative runs Knative Serving's controller for kinfer's local control plane,
// together with a test double of a networking layer.
//
// It is Knative's own cmd/controller with two differences that the local control plane
// needs and that change no reconciler's behaviour:
//   - the health-probe server on :8080 is off, because the Knative autoscaler binds :8080
//     (its stat websocket) in the same network namespace;
//   - the cert-manager integration is left out (the local config-network does not use it);
//   - it also runs kinfer's KIngress test double (ingress.go): a stand-in for Istio or
//     Kourier that marks Knative Ingress objects Ready, so Routes and Services become Ready.
//
// The autoscaler and the webhook run unchanged from knative.dev/serving/cmd/*.
package main

import (
	"flag"

	"knative.dev/pkg/injection"
	"knative.dev/pkg/injection/sharedmain"
	"knative.dev/pkg/reconciler"
	"knative.dev/pkg/signals"
	"knative.dev/serving/pkg/reconciler/configuration"
	"knative.dev/serving/pkg/reconciler/domainmapping"
	"knative.dev/serving/pkg/reconciler/gc"
	"knative.dev/serving/pkg/reconciler/labeler"
	"knative.dev/serving/pkg/reconciler/nscert"
	"knative.dev/serving/pkg/reconciler/revision"
	"knative.dev/serving/pkg/reconciler/route"
	"knative.dev/serving/pkg/reconciler/serverlessservice"
	"knative.dev/serving/pkg/reconciler/service"
)

// The reconcilers of knative.dev/serving/cmd/controller (v0.50.0), plus the ingress double.
var ctors = []injection.ControllerConstructor{
	configuration.NewController,
	labeler.NewController,
	revision.NewController,
	route.NewController,
	serverlessservice.NewController,
	service.NewController,
	gc.NewController,
	nscert.NewController,
	domainmapping.NewController,
	newIngressController,
}

func main() {
	flag.DurationVar(&reconciler.DefaultTimeout,
		"reconciliation-timeout", reconciler.DefaultTimeout,
		"The amount of time to give each reconciliation of a resource to complete before its context is canceled.")
	ctx := signals.NewContext()
	cfg := injection.ParseAndGetRESTConfigOrDie()
	sharedmain.MainWithConfig(sharedmain.WithHealthProbesDisabled(ctx), "controller", cfg, ctors...)
}
