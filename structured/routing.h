// routing.h: what BTT-MoE layers report about their routing each step (the log's aux fields).
#pragma once

// One routed layer, or a model's routed layers folded together:
//   aux        the load-balancing loss E·Σ_e P̂_e·f̂_e + 0.1·mean_t(lse_t²) (moe.h)
//   balance    its first term alone: 1 when the router's mean probabilities or its selections
//              are even, up to E when both pile onto one expert
//   load_max   the busiest expert's share of the top-k selections times E: 1 when even, E/K at
//              most (every token picks the same K experts)
//   load_min   the idlest expert's share times E: 1 when even, 0 for an expert no token picks
// A model reports the mean aux and balance over its routed layers and the extremes of the loads.
typedef struct { float aux, balance, load_max, load_min; } MoERouting;

// Folds one layer into acc; `folded` is how many layers acc holds already (0 starts it).
static inline void moe_routing_fold(MoERouting *acc, const MoERouting *layer, int folded) {
    if (folded == 0) { *acc = *layer; return; }
    acc->aux += layer->aux;
    acc->balance += layer->balance;
    if (layer->load_max > acc->load_max) acc->load_max = layer->load_max;
    if (layer->load_min < acc->load_min) acc->load_min = layer->load_min;
}
// After folding n layers: the sums become means.
static inline void moe_routing_finish(MoERouting *acc, int n) {
    if (n > 0) { acc->aux /= n; acc->balance /= n; }
}
