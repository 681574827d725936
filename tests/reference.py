"""Slow, literal reference implementations of LPCAM (PAPER.md), for equivalence tests only.

Written from PAPER.md and the structure of the official release (one class at a time, one scale at a
time, one prototype at a time, each prototype repeated over the grid and compared with
``F.cosine_similarity``). Deliberately naive: nothing here is vectorised across prototypes or
classes, and nothing is shared with ``lpcam_core``.

Every computation runs in float32 on the CPU (inputs of other dtypes are converted first), outside
any autocast region.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def get_strided_size(orig_size, stride):
    """The IRN family's helper: ceil(size / stride)."""
    return ((orig_size[0] - 1) // stride + 1, (orig_size[1] - 1) // stride + 1)


def get_strided_up_size(orig_size, stride):
    strided = get_strided_size(orig_size, stride)
    return strided[0] * stride, strided[1] * stride


def reference_lpcam(features, class_centers, class_context, valid_cat, size):
    """PAPER.md steps 5-6, literally.

    Args:
        features: list over scales of [2, C, h, w] (image, flipped image).
        class_centers: {class: [k, C]} class prototypes.
        class_context: {class: [m, C]} context prototypes (m may be 0).
        valid_cat: the present classes, in order.
        size: (H, W).

    Returns:
        {"keys": int64 numpy [n], "cam": float32 tensor [n, H/4, W/4], "high_res": float32 tensor [n, H, W]}
        with the release's bare division by the maximum (no guard).
    """
    with torch.autocast("cpu", enabled=False):
        strided_size = get_strided_size(size, 4)
        strided_up_size = get_strided_up_size(size, 16)
        fused = []
        for pair in features:
            pair = pair.detach().cpu().float()
            fused.append(pair[0] + pair[1].flip(-1))

        strided_cams, highres_cams = [], []
        for class_id in valid_cat:
            class_id = int(class_id)
            strided_cam, highres_cam = [], []
            for feature in fused:
                c, h, w = feature.shape
                feature_here = feature.permute(1, 2, 0).reshape(h, w, c)
                cluster_feature = class_centers[class_id].float()
                att_maps = []
                for j in range(cluster_feature.shape[0]):
                    proto = cluster_feature[j].repeat(h, w, 1)
                    att = F.cosine_similarity(feature_here, proto, dim=2)
                    att_maps.append(att.unsqueeze(0).unsqueeze(0))
                att_map = torch.mean(torch.cat(att_maps, 0), 0, keepdim=True)  # [1, 1, h, w]

                context_feature = class_context.get(class_id, torch.empty(0, c)).float()
                if context_feature.shape[0] > 0:
                    ctx_maps = []
                    for j in range(context_feature.shape[0]):
                        proto = context_feature[j].repeat(h, w, 1)
                        ctx = F.cosine_similarity(feature_here, proto, dim=2)
                        ctx_maps.append(ctx.unsqueeze(0).unsqueeze(0))
                    ctx_map = torch.mean(torch.cat(ctx_maps, 0), 0, keepdim=True)
                    att_map = F.relu(att_map - ctx_map)
                # else: no subtraction and no ReLU (the release's rule)

                map1 = F.interpolate(att_map, strided_size, mode="bilinear", align_corners=False)[:, 0]
                map2 = F.interpolate(att_map, strided_up_size, mode="bilinear", align_corners=False)[
                    :, 0, : size[0], : size[1]
                ]
                strided_cam.append(map1)
                highres_cam.append(map2)
            strided_cam = torch.mean(torch.cat(strided_cam, 0), 0)
            highres_cam = torch.mean(torch.cat(highres_cam, 0), 0)
            strided_cam = strided_cam / torch.max(strided_cam)
            highres_cam = highres_cam / torch.max(highres_cam)
            strided_cams.append(strided_cam.unsqueeze(0))
            highres_cams.append(highres_cam.unsqueeze(0))
        return {
            "keys": np.asarray([int(c) for c in valid_cat], dtype=np.int64),
            "cam": torch.cat(strided_cams, 0),
            "high_res": torch.cat(highres_cams, 0),
        }


def reference_split(feature, high_res, valid_cat, class_id, select_thres):
    """PAPER.md step 2 for one image and one class, literally.

    Args:
        feature: [C, h, w] features.
        high_res: [n, H, W] float32 numpy (or tensor) normalised CAMs of the present classes.
        valid_cat: their class indices.
        class_id: the class to split for.
        select_thres: tau.

    Returns:
        (selected rows [Nf, C], not-selected rows [Nb, C]) as float32 tensors.
    """
    feature_map = feature.detach().cpu().float().permute(1, 2, 0)
    size = feature_map.shape[:2]
    mask = F.interpolate(torch.as_tensor(np.asarray(high_res)).unsqueeze(0), size)[0]
    selected, not_selected = [], []
    for i in range(len(valid_cat)):
        if int(valid_cat[i]) == int(class_id):
            m = mask[i]
            selected.append(feature_map[m > select_thres])
            not_selected.append(feature_map[m < select_thres])
    c = feature_map.shape[2]
    if not selected:
        return torch.empty(0, c), torch.empty(0, c)
    return torch.cat(selected, 0), torch.cat(not_selected, 0)


def reference_select(centers, weight, class_id, class_thres, context_thres, context_thres_low):
    """PAPER.md step 4, literally: (class-prototype mask, context-prototype mask) for one class's centres.

    ``centers`` is used for both pools here: the caller passes the pool it cares about.
    """
    sim = torch.mm(centers.float(), weight.float().T)
    prob = F.softmax(sim, dim=1)
    class_mask = prob[:, class_id] > class_thres
    context_mask = (prob[:, class_id] > context_thres_low) * (prob[:, class_id] < context_thres)
    return class_mask, context_mask
