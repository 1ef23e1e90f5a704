package main

import (
	"context"

	"knative.dev/networking/pkg/apis/networking/v1alpha1"
	ingressinformer "knative.dev/networking/pkg/client/injection/informers/networking/v1alpha1/ingress"
	ingressreconciler "knative.dev/networking/pkg/client/injection/reconciler/networking/v1alpha1/ingress"
	"knative.dev/pkg/configmap"
	"knative.dev/pkg/controller"
	"knative.dev/pkg/network"
	pkgreconciler "knative.dev/pkg/reconciler"
)

// ingressClass is the KIngress class the local control plane's config-network selects.
const ingressClass = "kinfer-test.ingress.networking.knative.dev"

// ingressDouble is a TEST DOUBLE for a Knative networking layer (Istio, Kourier, Contour).
// There is no data plane in the local control plane (fake pods have no processes), so it
// programs nothing: it marks every Ingress of its class as configured and its load balancer
// ready, which is what a real networking layer reports once its proxies have the routes.
type ingressDouble struct{}

func (*ingressDouble) ReconcileKind(_ context.Context, ing *v1alpha1.Ingress) pkgreconciler.Event {
	ing.Status.InitializeConditions()
	lb := []v1alpha1.LoadBalancerIngressStatus{{
		DomainInternal: network.GetServiceHostname("kinfer-test-gateway", "knative-serving"),
	}}
	ing.Status.MarkLoadBalancerReady(lb, lb)
	ing.Status.MarkNetworkConfigured()
	return nil
}

func newIngressController(ctx context.Context, _ configmap.Watcher) *controller.Impl {
	impl := ingressreconciler.NewImpl(ctx, &ingressDouble{}, ingressClass)
	ingressinformer.Get(ctx).Informer().AddEventHandler(controller.HandleAll(impl.Enqueue))
	return impl
}
